"""Every connection method on the same endpoints, side by side.

For two endpoint files: align once, fit each method (reusing an earlier fit of the same
endpoints, data and options), evaluate every path on the same grid of t, and collect one row
per method: barriers, worst test error, lengths in weights and in predictions, wall time, and
the K-member ensemble's test accuracy and NLL. The unaligned straight line is always included
as the baseline. :func:`compare_energy` does the same on an analytic landscape.

Rows are ranked by the train-loss barrier above the chord between the endpoint losses
(``max_t L(t) - ((1-t) L(0) + t L(1))``, :func:`modeconn.metrics.barriers`' ``linear``), best
first. The barrier above the endpoints' mean cannot rank them: it never falls below half the
gap between the endpoint losses, so every path that stays near the chord ties at that floor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path as FsPath

import torch

from modeconn.bn import DEFAULT_BN_EXAMPLES
from modeconn.checkpoint import Checkpoint
from modeconn.data import Dataset
from modeconn.evaluate import evaluate_energy_path
from modeconn.fit.configs import MethodConfig
from modeconn.fit.connect import connect
from modeconn.fit.methods import METHODS, make_config
from modeconn.metrics import barriers
from modeconn.models.spec import PermutationSpec
from modeconn.types import Energy

__all__ = ["ComparisonRow", "compare", "compare_energy", "rank_rows", "DEFAULT_METHODS"]

log = logging.getLogger("modeconn")

DEFAULT_METHODS = ("linear", "bezier", "polychain", "neb", "autoneb", "geodesic")


@dataclass(frozen=True)
class ComparisonRow:
    label: str
    method: str
    aligned: bool
    artifact: str | None
    seconds: float
    loss_barrier: float  # train loss, mean-endpoint definition
    loss_barrier_max: float  # train loss above the worse endpoint
    loss_barrier_linear: float  # train loss above the chord of the endpoint losses: the ranking
    error_barrier: float  # test error, mean-endpoint definition
    error_barrier_linear: float  # test error above the chord of the endpoint errors
    worst_test_error: float
    weight_length: float
    prediction_length: float
    ensemble_k: int | None = None
    ensemble_acc: float | None = None
    ensemble_nll: float | None = None
    reused: bool = False
    rank: int = 0  # 1 for the lowest loss_barrier_linear (set by rank_rows; 0: not ranked)

    def to_json(self) -> dict:
        return asdict(self)


def _rank_key(barrier: float, *tie_breaks: float) -> tuple[bool, float, tuple[float, ...]]:
    """Lowest barrier first; a NaN barrier (a diverged path) last; then the tie-breaks."""
    nan = math.isnan(barrier)
    return (
        nan,
        0.0 if nan else barrier,
        tuple(math.inf if math.isnan(x) else x for x in tie_breaks),
    )


def rank_rows(rows: Sequence[ComparisonRow]) -> list[ComparisonRow]:
    """``rows`` best first, by ``loss_barrier_linear``, each with its ``rank`` (1 = best).

    Ties (every path on or below the chord scores 0) are broken by the test-error barrier above
    its chord, then by the worst test error; rows still tied keep their order. (The barrier above
    the endpoints' mean breaks none of them: a path below the chord peaks at an endpoint, so its
    mean barrier is half the endpoints' gap, like every other such path's.)
    """
    ranked = sorted(
        rows,
        key=lambda r: _rank_key(r.loss_barrier_linear, r.error_barrier_linear, r.worst_test_error),
    )
    return [replace(r, rank=i) for i, r in enumerate(ranked, start=1)]


def _path_barriers(ev: Mapping) -> tuple[dict[str, float], dict[str, float]]:
    """Train-loss and test-error barriers from an evaluation's per-t curves, on its own ts.

    Recomputed here rather than read from the stored summaries: a cached artifact may predate
    the ``linear`` barrier, and the chord needs the t of every point (a grid with a path's knots
    is not evenly spaced).
    """
    ts = ev["ts"]
    loss = barriers(ev["train_loss"], ts=ts)
    error = barriers([1.0 - a for a in ev["test_acc"]], ts=ts)
    return loss, error


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _cache_key(
    a: Checkpoint,
    b: Checkpoint,
    data: Dataset,
    method: str,
    config: dict,
    aligned,
    points: int,
    bn_examples: int | None = None,
) -> str:
    blob = json.dumps(
        {
            "points": points,  # the evaluation stored with the fit
            # BN statistics' inputs (absent: all of them, which keeps older keys valid)
            **({"bn_examples": bn_examples} if bn_examples else {}),
            "a": _file_digest(a.path_name),
            "b": _file_digest(b.path_name),
            "data": data.fingerprint(),
            "method": method,
            "config": config,
            "aligned": aligned,  # False, or the spec used ("inferred" when derived)
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def compare(
    a: Checkpoint,
    b: Checkpoint,
    data: Dataset,
    methods: list[str] | tuple[str, ...] = DEFAULT_METHODS,
    *,
    out_dir: str | os.PathLike,
    align: bool = True,
    params: Mapping[str, dict | MethodConfig] | None = None,
    ensemble_k: int = 4,
    device: torch.device | str | None = None,
    progress: bool = False,
    reuse: bool = True,
    eval_points: int = 61,
    spec: PermutationSpec | None = None,
    bn_examples: int | None = DEFAULT_BN_EXAMPLES,
) -> tuple[list[ComparisonRow], dict[str, dict]]:
    """Fit and evaluate ``methods`` between ``a`` and ``b``; returns rows and evaluations by label.

    Artifacts go to ``out_dir/<label>``. With ``align`` every method connects A to the aligned
    B (permuted with ``spec``, default: inferred from the graph), and the unaligned straight line
    is added as the baseline. Rows come ranked, best first (:func:`rank_rows`); the evaluations
    keep the order the methods were fitted in.
    """
    from modeconn.artifact import load_artifact
    from modeconn.pipeline import fit_artifact

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    params = params or {}
    out_dir = FsPath(out_dir)
    runs: list[tuple[str, str, bool]] = []
    if align:
        runs.append(("linear-unaligned", "linear", False))
    runs += [(m if align or m != "linear" else "linear", m, align) for m in methods]
    if not align:
        runs = [(m, m, False) for m in methods]

    rows: list[ComparisonRow] = []
    evaluations: dict[str, dict] = {}
    for label, method, aligned in runs:
        given = params.get(method, {})
        config = given if isinstance(given, MethodConfig) else make_config(method, **given)
        key = _cache_key(
            a,
            b,
            data,
            method,
            config.model_dump(),
            aligned and (spec or "inferred"),
            eval_points,
            bn_examples,
        )
        target = out_dir / label
        artifact = None
        reused = False
        if reuse and (target / "manifest.json").exists():
            try:
                cached = load_artifact(target)
                if cached.manifest.fit.get("cache_key") == key and cached.manifest.metrics:
                    artifact, reused = cached, True
                    log.info("%s: reusing %s", label, target)
            except (ValueError, FileNotFoundError) as err:
                log.warning("%s: cannot reuse %s (%s); fitting again", label, target, err)
        if artifact is None:
            log.info("%s: fitting %s%s", label, method, " (aligned)" if aligned else "")
            artifact, _ = fit_artifact(
                a,
                b,
                data,
                method,
                out=target,
                align=aligned,
                spec=spec,
                config=config,
                device=device,
                progress=progress,
                eval_points=eval_points,
                cache_key=key,
                bn_examples=bn_examples,
            )
        ev = artifact.manifest.metrics
        loss_barrier, error_barrier = _path_barriers(ev)
        ensemble = _ensemble_metrics(artifact, data, ensemble_k, device) if ensemble_k else {}
        rows.append(
            ComparisonRow(
                label=label,
                method=method,
                aligned=aligned,
                artifact=str(target),
                seconds=float(artifact.manifest.fit.get("seconds", 0.0)),
                loss_barrier=loss_barrier["mean"],
                loss_barrier_max=loss_barrier["max"],
                loss_barrier_linear=loss_barrier["linear"],
                error_barrier=error_barrier["mean"],
                error_barrier_linear=error_barrier["linear"],
                worst_test_error=ev["worst_test_error"],
                weight_length=ev["weight_length"],
                prediction_length=ev["prediction_length"],
                reused=reused,
                **ensemble,
            )
        )
        evaluations[label] = ev
    return rank_rows(rows), evaluations


def _ensemble_metrics(artifact, data: Dataset, k: int, device) -> dict:
    """Test accuracy and NLL of the K-member ensemble along the path."""
    from modeconn.ensemble import evaluate_ensemble

    result = evaluate_ensemble(artifact, data, k=k, device=device)
    return {"ensemble_k": k, "ensemble_acc": result["accuracy"], "ensemble_nll": result["nll"]}


def compare_energy(
    energy: Energy,
    start: torch.Tensor,
    end: torch.Tensor,
    methods: list[str] | tuple[str, ...] = ("linear", "bezier", "polychain", "neb", "autoneb"),
    *,
    params: dict[str, dict] | None = None,
    points: int = 101,
) -> list[dict]:
    """The same comparison on an analytic landscape: barriers, mean loss, length, time, work.

    ``barrier`` is above the endpoints' mean, ``barrier_linear`` above the chord of the endpoint
    energies; ``rank`` orders the methods by ``barrier_linear`` (1 = lowest). Rows keep the order
    of ``methods``.
    """
    params = params or {}
    rows = []
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        stats: dict = {}
        begin = time.perf_counter()
        path = connect(energy, start, end, method, stats=stats, **params.get(method, {}))
        seconds = time.perf_counter() - begin
        ev = evaluate_energy_path(energy, path, points=points)
        barrier = barriers(ev["loss"], ts=ev["ts"])
        rows.append(
            {
                "method": method,
                "barrier": barrier["mean"],
                "barrier_linear": barrier["linear"],
                "max_loss": ev["barrier"]["peak"],
                "mean_loss": ev["mean_loss"],
                "weight_length": ev["weight_length"],
                "seconds": seconds,
                "gradient_evaluations": stats.get("gradient_evaluations"),
            }
        )
    order = sorted(
        range(len(rows)), key=lambda i: _rank_key(rows[i]["barrier_linear"], rows[i]["barrier"])
    )
    for rank, i in enumerate(order, start=1):
        rows[i]["rank"] = rank
    return rows
