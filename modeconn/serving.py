"""Serving bundles: the ONNX graphs an HTTP service loads for one path artifact, built offline.

A bundle lives inside the artifact it serves::

    <artifact>/serving/index.json          what was built (ServingIndex)
    <artifact>/serving/ensemble_k4.onnx    one graph per K-member ensemble (members evenly in t)
    <artifact>/serving/merged_t0.5000.onnx one graph per merged model at a served t

A bundle also holds a confidence cascade (:mod:`modeconn.cascade`) of K members by default:
the merged-model graphs at the t values of the K-member ensemble, which the service runs one
at a time, each input leaving once its stop rule holds. The index names them (its
``cascade``); they are ordinary merged graphs, also served as such.

Every graph comes from :mod:`modeconn.export` (one graph per ensemble, mean softmax and
per-input uncertainty out; Garipov et al. 2018, arXiv 1802.10026), so the service itself needs
only onnxruntime. BatchNorm models get graphs only where the artifact stores BN statistics
(its served t values); a point set (FGE) only at its members. The bundle is written to a
temporary directory and renamed, so a crash never leaves half of one. The index records each
graph's SHA-256: a bundle whose files no longer match it is rebuilt, never kept or saved.

Building needs torch (:func:`build_serving`); reading does not (:mod:`modeconn.formats`,
:func:`find_served`): this module imports torch only inside :func:`build_serving`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from modeconn.formats import (
    INDEX_FILE,
    MANIFEST_FILE,
    SERVING_DIR,
    IntegrityError,
    ServedCascade,
    ServedGraph,
    ServingIndex,
    ensemble_file,
    file_sha256,
    int8_file,
    match_t,
    merged_file,
    read_index,
    read_manifest,
    unique_ts,
    verify_graph,
)

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_TS",
    "DEFAULT_CASCADE",
    "DEFAULT_MAX_ENSEMBLE_MB",
    "build_serving",
    "find_artifacts",
    "find_served",
    "current_index",
    "save_to_store",
    "store_path",
]

log = logging.getLogger("modeconn")

#: Ensemble sizes built by default (sizes above the member count of a point set are skipped).
DEFAULT_KS: tuple[int, ...] = (2, 3, 4, 5, 8)
#: t values of the merged models built by default.
DEFAULT_TS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Members of the cascade built by default (0: none); its stop rule is StopRule's default.
DEFAULT_CASCADE = 8
#: Ensembles whose weights would exceed this many megabytes are skipped.
DEFAULT_MAX_ENSEMBLE_MB = 512.0


# ---------------------------------------------------------------------------------------------
# Reading (no torch)


def _walk(root: Path) -> Iterable[Path]:
    """Directories under ``root`` (itself included), skipping hidden and serving folders."""
    for current, dirs, _files in os.walk(root, followlinks=False):
        # Hidden folders include the temporary ones of atomic writes (".name.xxxx.tmp").
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != SERVING_DIR)
        yield Path(current)


def find_artifacts(root: str | os.PathLike) -> list[Path]:
    """Artifact directories (holding ``manifest.json``) at or below ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"directory not found: {root}")
    return [d for d in _walk(root) if (d / MANIFEST_FILE).is_file()]


def find_served(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(name, directory)`` of every artifact with a serving bundle at or below ``root``.

    The name is the directory's path relative to ``root`` in POSIX form (``"paths/bezier"``;
    ``"."`` when ``root`` itself is the artifact).
    """
    root = Path(root)
    return [
        (d.relative_to(root).as_posix(), d)
        for d in find_artifacts(root)
        if (d / SERVING_DIR / INDEX_FILE).is_file()
    ]


def current_index(directory: str | os.PathLike) -> ServingIndex | None:
    """The serving index of the artifact in ``directory`` when it has a bundle built from this
    very artifact (the manifest's creation stamp), else None: no bundle, an unreadable one, or
    one of an earlier version of the artifact. Its graphs are not checked here: open them with
    :func:`modeconn.formats.read_graph`, which checks each one's SHA-256."""
    try:
        index = read_index(directory)
        created = read_manifest(directory).created
    except (OSError, ValueError):
        return None
    return index if created and index.artifact_created == created else None


# ---------------------------------------------------------------------------------------------
# Building (torch)


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ensemble sizes must be positive integers, got {k!r} in {list(ks)}")
        out.append(int(k))
    return sorted(set(out))


def _check_ts(ts: Sequence[float]) -> list[float]:
    values = []
    for t in ts:
        try:
            value = float(t)
        except (TypeError, ValueError) as err:
            raise ValueError(f"t values must be numbers in [0, 1], got {t!r}") from err
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise ValueError(f"t values must lie in [0, 1], got {t!r}")
        values.append(value)
    return unique_ts(values)


def _check_cascade(k: object, rule: object, threshold: object) -> dict:
    """``{"k", "rule", "threshold"}`` of a cascade request (k = 0: none), validated."""
    from modeconn.cascade import StopRule

    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"the cascade's size must be an integer >= 0 (0: none), got {k!r}")
    if not isinstance(threshold, int | float) or isinstance(threshold, bool):
        raise ValueError(f"the cascade's threshold must be a number, got {threshold!r}")
    stop = StopRule(rule, float(threshold))  # type: ignore[arg-type]  # raises if invalid
    return {"k": k, "rule": stop.rule, "threshold": stop.threshold}


def _previous_request(directory: Path) -> dict:
    """``{"ks", "ts", "cascade"}`` an existing bundle was built with (any may be absent), read
    leniently: also from an index of an earlier format, which a rebuild replaces."""
    try:
        raw = json.loads((directory / SERVING_DIR / INDEX_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    requested = raw.get("requested") if isinstance(raw, dict) else None
    if not isinstance(requested, dict):
        return {}
    out = {}
    for key, check in (("ks", _check_ks), ("ts", _check_ts)):
        try:
            if isinstance(requested.get(key), list):
                out[key] = check(requested[key])
        except ValueError:
            pass
    if isinstance(requested.get("int8"), bool):
        out["int8"] = requested["int8"]
    cascade = requested.get("cascade")
    if isinstance(cascade, dict):
        with contextlib.suppress(TypeError, ValueError):
            out["cascade"] = _check_cascade(
                cascade.get("k"), cascade.get("rule"), cascade.get("threshold")
            )
    return out


def _verify_bundle(directory: Path, index: ServingIndex) -> None:
    """Every graph of ``index`` is the regular file it records (``IntegrityError`` if not)."""
    for graph in index.graphs:
        verify_graph(directory, graph)


def _up_to_date(directory: Path, requested: dict | None) -> ServingIndex | None:
    """The existing index when it was built from this very artifact (with ``requested``
    ks and ts, unless that is None) and its graphs are still what it records."""
    index = current_index(directory)
    if index is None:
        return None
    if requested is not None and index.requested != requested:
        return None
    try:
        _verify_bundle(directory, index)
    except IntegrityError as err:
        log.warning("rebuilding the serving bundle of %s: %s", directory, err)
        return None
    return index


def build_serving(
    artifact_dir: str | os.PathLike,
    *,
    ks: Sequence[int] | None = None,
    ts: Sequence[float] | None = None,
    cascade: int | None = None,
    rule: str | None = None,
    threshold: float | None = None,
    int8: bool | None = None,
    int8_tolerance: float | None = None,
    data=None,
    max_ensemble_mb: float = DEFAULT_MAX_ENSEMBLE_MB,
    force: bool = False,
    atol: float = 1e-4,
) -> ServingIndex:
    """Build ``<artifact_dir>/serving/``: K-member ensembles for K in ``ks`` and merged models
    at the t values ``ts``, each one ONNX graph (:mod:`modeconn.export`), plus ``index.json``;
    and a cascade of ``cascade`` members (0: none) with the stop ``rule`` and ``threshold``
    (:class:`modeconn.cascade.StopRule`), whose members are merged graphs at the t values of
    the ``cascade``-member ensemble, added to those of ``ts`` where missing. With ``int8``,
    every graph also gets an int8 copy (:func:`modeconn.quantize.quantize_onnx`: calibrated
    on training inputs of ``data``, default the data set the artifact was fitted on, and
    checked against fp32 on its test split; a copy that loses more than ``int8_tolerance``
    accuracy points is skipped, with the reason).

    Graphs that cannot be served are skipped and listed in the index with the reason: BatchNorm
    models without stored statistics at a t (see ``PathArtifact.served_ts``), point sets (FGE)
    at t values that are not members or with fewer than K members, ensembles heavier than
    ``max_ensemble_mb``. ``ks``/``ts`` default to what an existing bundle was built with (also
    with ``force``, and from an index of an earlier format), else to
    :data:`DEFAULT_KS`/:data:`DEFAULT_TS`/:data:`DEFAULT_CASCADE` (the same goes for the cascade
    and its rule). A bundle already built from this very artifact, whose graphs still match
    their recorded SHA-256, is kept unless ``force``, or unless ``ks``, ``ts`` or the cascade
    are given and differ from what it was built with. Written atomically (temporary
    folders of killed runs are removed first, see :func:`modeconn.io.atomic_dir`); returns the
    index.
    """
    from modeconn.artifact import load_artifact
    from modeconn.bn import has_batchnorm
    from modeconn.cascade import StopRule, cascade_order
    from modeconn.ensemble import choose_ts
    from modeconn.export import export_ensemble, export_merged
    from modeconn.io import atomic_dir, atomic_file

    directory = Path(artifact_dir)
    explicit = any(v is not None for v in (ks, ts, cascade, rule, threshold, int8))
    previous = _previous_request(directory)
    ks = _check_ks(previous.get("ks", DEFAULT_KS) if ks is None else ks)
    ts = _check_ts(previous.get("ts", DEFAULT_TS) if ts is None else ts)
    before = previous.get("cascade", {})
    default = StopRule()
    wanted = _check_cascade(
        before.get("k", DEFAULT_CASCADE) if cascade is None else cascade,
        (before.get("rule", default.rule) if rule is None else rule),
        (before.get("threshold", default.threshold) if threshold is None else threshold),
    )
    int8 = bool(previous.get("int8", False) if int8 is None else int8)
    if not ks and not ts and not wanted["k"]:
        raise ValueError(
            "nothing to build: give at least one ensemble size, t value or cascade size"
        )
    if not max_ensemble_mb > 0:
        raise ValueError(f"max_ensemble_mb must be > 0, got {max_ensemble_mb!r}")
    requested = {"ks": ks, "ts": ts, "cascade": wanted, "int8": int8} if explicit else None
    if not force and (index := _up_to_date(directory, requested)) is not None:
        log.info("serving bundle of %s is up to date (%d graphs)", directory, len(index.graphs))
        return index
    artifact = load_artifact(directory)  # a corrupt artifact fails here, before any write
    manifest = artifact.manifest

    model = artifact.build_model()
    batchnorm = has_batchnorm(model)
    member_mb = sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2**20
    points = manifest.kind == "points"
    knots = [float(x) for x in artifact.path.knots()]

    def unserved(values: Sequence[float]) -> list[float]:
        """t values among ``values`` that this artifact cannot serve without data."""
        if points:
            return [t for t in values if match_t(t, knots) is None]
        if batchnorm:
            return [t for t in values if artifact.served_t(t) is None]
        return []

    plan: list[tuple[Literal["ensemble", "merged"], int, list[float]]] = []
    skipped: list[dict] = []
    for k in ks:
        if k * member_mb > max_ensemble_mb:
            reason = f"{k} members of {member_mb:.1f} MB exceed max_ensemble_mb={max_ensemble_mb}"
            skipped.append({"mode": "ensemble", "k": k, "reason": reason})
            continue
        try:
            members = choose_ts(artifact.path, k)
        except ValueError as err:  # e.g. more members than a point set holds
            skipped.append({"mode": "ensemble", "k": k, "reason": str(err)})
            continue
        if missing := unserved(members):
            reason = f"no stored BatchNorm statistics at t={missing}"
            skipped.append({"mode": "ensemble", "k": k, "reason": reason})
            continue
        plan.append(("ensemble", k, members))
    for t in ts:
        if unserved([t]):
            reason = (
                f"not a member of this point set (members at t={[round(x, 4) for x in knots]})"
                if points
                else "no stored BatchNorm statistics at this t"
            )
            skipped.append({"mode": "merged", "t": t, "reason": reason})
            continue
        plan.append(("merged", 1, [t]))
    cascade_ts: list[float] = []  # the cascade's members, in the order they run
    if k := wanted["k"]:
        reason = None
        if k * member_mb > max_ensemble_mb:
            reason = f"{k} members of {member_mb:.1f} MB exceed max_ensemble_mb={max_ensemble_mb}"
        else:
            try:
                members = choose_ts(artifact.path, k)
            except ValueError as err:
                reason = str(err)
            else:
                if missing := unserved(members):
                    reason = f"no stored BatchNorm statistics at t={missing}"
        if reason is not None:
            skipped.append({"mode": "cascade", "k": k, "reason": reason})
        else:
            cascade_ts = [members[i] for i in cascade_order(members)]
            planned = [p[2][0] for p in plan if p[0] == "merged"]
            for t in members:
                if match_t(t, planned) is None:
                    plan.append(("merged", 1, [t]))

    begin = time.perf_counter()
    graphs: list[ServedGraph] = []
    with atomic_dir(directory / SERVING_DIR) as tmp:
        for mode, k, members in plan:
            file = ensemble_file(k) if mode == "ensemble" else merged_file(members[0])
            try:
                if mode == "ensemble":
                    # one line for the whole bundle (below); each graph's at DEBUG
                    result = export_ensemble(
                        artifact, tmp / file, k, atol=atol, log_level=logging.DEBUG
                    )
                else:
                    result = export_merged(
                        artifact, tmp / file, members[0], atol=atol, log_level=logging.DEBUG
                    )
            except (ValueError, RuntimeError) as err:
                log.warning("serving bundle of %s: skipped %s %s: %s", directory, mode, file, err)
                entry: dict[str, object] = {"mode": mode, "reason": str(err)}
                entry.update({"k": k} if mode == "ensemble" else {"t": members[0]})
                skipped.append(entry)
                continue
            graphs.append(
                ServedGraph(
                    mode=mode,
                    k=k,
                    ts=[float(t) for t in result.manifest["ts"]],
                    file=file,
                    sha256=file_sha256(tmp / file),
                    size_bytes=result.size_bytes,
                    max_abs_diff=result.max_abs_diff,
                    bn=[str(b) for b in result.manifest.get("bn", [])],
                )
            )
        if int8:
            graphs += _quantize_all(tmp, graphs, artifact, data, int8_tolerance, skipped)
        served_cascade = None
        if cascade_ts:
            built = {g.ts[0]: g for g in graphs if g.mode == "merged"}
            found = [match_t(t, built) for t in cascade_ts]
            if None in found:
                lost = [t for t, f in zip(cascade_ts, found) if f is None]
                reason = f"its member graphs at t={lost} could not be built (see above)"
                skipped.append({"mode": "cascade", "k": wanted["k"], "reason": reason})
            else:
                served_cascade = ServedCascade(
                    k=len(cascade_ts),
                    ts=[float(t) for t in found if t is not None],
                    rule=wanted["rule"],
                    threshold=wanted["threshold"],
                )
        if not graphs:
            reasons = "; ".join(
                f"{s['mode']} {s.get('k', s.get('t'))}: {s['reason']}" for s in skipped
            )
            raise ValueError(f"{directory}: no graph could be built for serving ({reasons})")
        index = ServingIndex(
            artifact_created=manifest.created,
            has_batchnorm=batchnorm,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            requested={"ks": ks, "ts": ts, "cascade": wanted, "int8": int8},
            graphs=graphs,
            skipped=skipped,
            cascade=served_cascade,
        )
        with atomic_file(tmp / INDEX_FILE) as index_tmp:
            index_tmp.write_text(json.dumps(index.model_dump(), indent=2) + "\n")
        # Temporary files are private (0600); a bundle is read by whoever serves it, e.g. the
        # unprivileged user of a container built with `bentoml containerize`.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
    log.info(
        "serving bundle of %s: %d graphs (%d skipped) in %.1fs",
        directory,
        len(graphs),
        len(skipped),
        time.perf_counter() - begin,
    )
    return index


def _quantize_all(
    folder: Path,
    graphs: Sequence[ServedGraph],
    artifact,
    data,
    tolerance: float | None,
    skipped: list[dict],
) -> list[ServedGraph]:
    """Int8 copies of ``graphs`` (files in ``folder``), checked on ``data``'s test split; the
    refused ones are added to ``skipped``."""
    from modeconn.data import load_data
    from modeconn.quantize import (
        DEFAULT_TOLERANCE,
        QuantizationRefused,
        calibration_sample,
        quantize_onnx,
    )

    if data is None:  # the data set the artifact was fitted on
        data = load_data(artifact.data_spec())
    calibration = calibration_sample(data.x_train.numpy(), seed=0)
    x_test, y_test = data.x_test.numpy(), data.y_test.numpy()
    out = []
    for graph in graphs:
        file = int8_file(graph.file)
        try:
            result = quantize_onnx(
                folder / graph.file,
                folder / file,
                x_test=x_test,
                y_test=y_test,
                calibration=calibration,
                tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
            )
        except (QuantizationRefused, ValueError, RuntimeError) as err:
            log.warning("serving bundle: no int8 copy of %s: %s", graph.file, err)
            what = {"k": graph.k} if graph.mode == "ensemble" else {"t": graph.ts[0]}
            skipped.append({"mode": graph.mode, **what, "precision": "int8", "reason": str(err)})
            continue
        check = result.check
        out.append(
            graph.model_copy(
                update={
                    "file": file,
                    "sha256": file_sha256(folder / file),
                    "size_bytes": result.size_bytes,
                    "precision": "int8",
                    "int8_check": {
                        "examples": check.examples,
                        "agreement": check.agreement,
                        "accuracy_fp32": check.accuracy_fp32,
                        "accuracy_int8": check.accuracy_int8,
                        "accuracy_drop_points": check.accuracy_drop_points,
                    },
                }
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# The BentoML model store


def save_to_store(artifact_dir: str | os.PathLike, name: str | None = None) -> str:
    """Copy an artifact's manifest and serving bundle into the BentoML model store.

    The service loads store models named in ``MODECONN_MODELS`` (comma-separated tags), and
    ``bentoml build`` packs the models a ``bentofile.yaml`` lists. Returns the new tag
    (``name:version``; default name ``modeconn-<directory name>``).
    """
    import shutil

    import bentoml

    directory = Path(artifact_dir)
    index = read_index(directory)  # refuses an artifact without a bundle
    _verify_bundle(directory, index)  # nor a bundle whose graphs changed since they were built
    manifest = read_manifest(directory)
    name = name or f"modeconn-{directory.name}"
    with bentoml.models.create(
        name,
        labels={"project": "modeconn", "method": manifest.method},
        metadata={"name": manifest.name, "graphs": len(index.graphs), "kind": manifest.kind},
    ) as model:
        target = Path(model.path)
        shutil.copy2(directory / MANIFEST_FILE, target / MANIFEST_FILE)
        shutil.copytree(directory / SERVING_DIR, target / SERVING_DIR)
    log.info("saved %s to the BentoML model store as %s", directory, model.tag)
    return str(model.tag)


def store_path(tag: str) -> tuple[str, Path]:
    """``(name, directory)`` of a model saved by :func:`save_to_store` (``name:version`` tag)."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound as err:
        raise FileNotFoundError(f"no model {tag!r} in the BentoML model store ({err})") from None
    directory = Path(model.path)
    if not (directory / SERVING_DIR / INDEX_FILE).is_file():
        raise ValueError(f"store model {tag!r} holds no serving bundle; save it with save_to_store")
    return model.tag.name, directory
