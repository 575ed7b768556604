"""The served paths: every artifact with a serving bundle under a models directory, its ONNX
graphs opened once with onnxruntime (CUDA first, CPU fallback), and the checks that turn a
request into one graph and one input array.

No torch here: manifests and bundles are read as the typed records of :mod:`modeconn.formats`,
graphs with :class:`modeconn.runtime.OnnxModel`. Every user error is a :class:`RequestError`
carrying an HTTP status and a message that lists the valid choices.

A graph is opened or exported only as its serving index records it (:mod:`service.graph`).
Any other graph is refused, with one log line and a 503 for its requests, while the rest keeps
serving; a bundle that cannot be read at all leaves its path refused (503) the same way.

A request runs one graph (an ensemble or a merged model), or for mode ``cascade`` the bundle's
cascade of merged graphs (:mod:`service.cascade`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime  # noqa: F401 - loaded when the worker starts, not on its first request

from modeconn.cascade import RULES, StopRule
from modeconn.formats import (
    SERVING_DIR,
    Manifest,
    ServedCascade,
    ServingIndex,
    int8_file,
    match_t,
    read_index,
    read_manifest,
)
from modeconn.runtime import Device
from modeconn.serving import find_served, store_path

from .cascade import CascadeRun
from .errors import REFUSED, RequestError, clip
from .graph import Graph
from .preprocess import image_to_input, normalize_raw
from .schemas import PathInfo, PredictRequest, PredictResponse

__all__ = ["REFUSED", "RequestError", "Graph", "CascadeRun", "ServedPath", "Catalog"]

log = logging.getLogger("modeconn.service")

#: What a request runs: one graph, or a cascade of merged graphs.
Runner = Graph | CascadeRun


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


@dataclass
class ServedPath:
    """A path artifact with its serving bundle."""

    name: str
    directory: Path
    index: ServingIndex
    manifest: Manifest
    ensembles: dict[int, Graph]
    merged: dict[float, Graph]
    cascade: ServedCascade | None = None  # its members are graphs of ``merged``
    int8: dict[str, Graph] = field(default_factory=dict)  # int8 copies by their fp32 file

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.model.input_shape)

    @property
    def preprocessing(self) -> dict:
        return self.manifest.preprocessing

    def graphs(self) -> list[Graph]:
        return [*self.ensembles.values(), *self.merged.values(), *self.int8.values()]

    def info(self) -> PathInfo:
        """What GET /paths says about this path."""
        metrics = self.manifest.metrics
        test_acc = metrics.get("test_acc") or []
        grid = metrics.get("ts") or []

        def pick(d: dict | None, key: str) -> float | None:
            value = (d or {}).get(key)
            return float(value) if isinstance(value, int | float) else None

        mid = None
        if test_acc and len(grid) == len(test_acc):
            mid = float(test_acc[min(range(len(grid)), key=lambda i: abs(grid[i] - 0.5))])
        return PathInfo(
            name=self.name,
            method=self.manifest.method,
            kind=self.manifest.kind,
            model={"name": self.manifest.model.name, "kwargs": self.manifest.model.kwargs},
            input_shape=list(self.input_shape),
            num_classes=self.manifest.model.num_classes,
            preprocessing=self.preprocessing,
            ks=sorted(self.ensembles),
            ensemble_ts={str(k): g.ts for k, g in sorted(self.ensembles.items())},
            served_ts=sorted(self.merged),
            barrier={
                f"{what}_{kind}": pick(metrics.get(f"{what}_barrier"), kind)
                for what in ("loss", "error")
                for kind in ("mean", "max", "linear")  # linear: above the chord
            },
            accuracy={
                "t0": float(test_acc[0]) if test_acc else None,
                "t1": float(test_acc[-1]) if test_acc else None,
                "midpoint": mid,
                "worst": float(min(test_acc)) if test_acc else None,
            },
            alignment=bool(self.manifest.alignment),
            cascade=self.cascade,
            graphs=[g.entry for g in self.graphs()],
        )


def _entropy(probs: np.ndarray, log_probs: np.ndarray) -> np.ndarray:
    # p log p with p = 0 contributes 0 (log_probs may be -inf there).
    terms = np.where(probs > 0, probs * log_probs, 0.0)  # (N, C)
    return -terms.sum(axis=-1)  # (N,)


class Catalog:
    """Every served path, by name; ``refused`` holds, by name, the answer (503) for the paths
    whose bundle could not be loaded."""

    def __init__(self, paths: dict[str, ServedPath], refused: dict[str, str] | None = None):
        self.paths = paths
        self.refused = refused or {}

    @classmethod
    def load(
        cls,
        root: str | os.PathLike | None,
        tags: list[str] | tuple[str, ...] = (),
        *,
        device: Device = "auto",
        intra_op_threads: int | None = None,
        preload: bool = True,
    ) -> Catalog:
        """Every artifact with a serving bundle at or below ``root`` (named by its relative
        path, see ``find_served``) plus the BentoML store models ``tags`` (named by model name).

        A broken bundle is logged and its path refused (503); the others are served. A graph
        that does not match its serving index is refused alone (see :class:`Graph`).
        ``preload`` opens every graph now (readiness then means every graph was loaded or
        refused), otherwise each is hashed and opened on first use. Nothing to serve (no
        bundle, or every bundle refused) is a ``ValueError``: a server would answer nothing.
        """
        found: list[tuple[str, Path]] = []
        if root is not None:
            root = Path(root)
            if root.is_dir():
                found += [(root.name if n == "." else n, d) for n, d in find_served(root)]
            elif not tags:
                raise FileNotFoundError(
                    f"models directory not found: {root} (set MODECONN_ARTIFACTS, or build the "
                    "demo artifacts with `python -m modeconn.demo --out artifacts`)"
                )
            else:
                log.warning("models directory %s not found; serving store models only", root)
        found += [store_path(tag) for tag in tags]  # a missing tag stops the start
        paths: dict[str, ServedPath] = {}
        refused: dict[str, str] = {}
        for name, directory in found:
            if name in paths:
                log.error(
                    "not serving %s: the name %r is taken by %s",
                    directory,
                    name,
                    paths[name].directory,
                )
                continue
            try:
                served = _load_path(name, directory, device, intra_op_threads)
                for graph in served.graphs():
                    try:
                        if preload:
                            graph.model  # noqa: B018 - opens the session
                        else:
                            graph.precheck()
                    except RequestError:
                        pass  # refused (and logged) alone: the path's other graphs serve
            except (OSError, ValueError, RuntimeError) as err:
                log.error("not serving %s: %s", directory, err)
                refused[name] = (
                    f"path {name!r} is refused: its serving bundle could not be loaded (the "
                    "server log says why); rebuild it with `modeconn serve-build DIR --force` "
                    "and restart the server"
                )
                continue
            paths[name] = served
        if not paths:
            where = f"under {root}" if root is not None else f"in the model store ({list(tags)})"
            if refused:
                raise ValueError(
                    f"nothing to serve {where}: every serving bundle was refused "
                    f"({', '.join(sorted(refused))}; see the errors above)"
                )
            raise ValueError(
                f"nothing to serve {where}: no serving bundle found; build them with "
                f"`modeconn serve-build {root}`"
            )
        catalog = cls(paths, refused)
        log.info(
            "serving %d paths (%s): %s",
            len(paths),
            catalog.provider() or "graphs open on first use",
            ", ".join(f"{n} ({len(p.graphs())} graphs)" for n, p in paths.items()),
        )
        return catalog

    def provider(self) -> str | None:
        """The execution provider of the graphs opened so far (``None`` if none is open)."""
        used = {g.model.provider for p in self.paths.values() for g in p.graphs() if g.loaded}
        return ", ".join(sorted(used)) if used else None

    # -- resolving a request ----------------------------------------------------------------

    def get(self, name: str) -> ServedPath:
        served = self.paths.get(name)
        if served is None and name in self.refused:
            raise RequestError(REFUSED, self.refused[name])
        if served is None:
            names = sorted(self.paths)
            raise RequestError(
                404,
                f"unknown path {clip(name)}; served paths: {names if names else 'none'}",
                {"path": names},
            )
        return served

    def graph(
        self,
        served: ServedPath,
        mode: str,
        k: int | None,
        t: float | None,
        rule: str | None = None,
        threshold: float | None = None,
        precision: str = "fp32",
    ) -> Runner:
        """What runs ``mode`` (``point`` is ``merged``) with ``k`` and ``t`` on ``served``:
        one graph, or for ``cascade`` its members with the stop rule (the bundle's, or
        ``rule``/``threshold``); the int8 copies with ``precision="int8"``. ``RequestError``
        503 if a graph needed is refused."""
        if mode == "cascade":
            runner: Runner = self._cascade(served, k, t, rule, threshold, precision)
        elif rule is not None or threshold is not None:
            raise RequestError(
                400,
                f"rule and threshold are the stop rule of mode 'cascade', not of mode {mode!r} "
                "(drop them, or use mode 'cascade')",
                {"mode": ["cascade"]},
            )
        else:
            runner = self._in_precision(served, self._select(served, mode, k, t), precision)
        runner.ensure_usable()
        return runner

    def _in_precision(self, served: ServedPath, graph: Graph, precision: str) -> Graph:
        """``graph`` (fp32) or its int8 copy."""
        if precision == "fp32":
            return graph
        copy = served.int8.get(graph.entry.file)
        if copy is None:
            built = sorted(g.entry.file for g in served.int8.values())
            raise RequestError(
                400,
                f"path {served.name!r} has no int8 copy of {graph.entry.file} (int8 graphs: "
                f"{built or 'none'}); build them with `modeconn serve-build DIR --int8`, or "
                "use precision 'fp32'",
                {"precision": ["fp32", "int8"] if built else ["fp32"]},
            )
        return copy

    def _cascade(
        self,
        served: ServedPath,
        k: int | None,
        t: float | None,
        rule: str | None,
        threshold: float | None,
        precision: str = "fp32",
    ) -> CascadeRun:
        cascade = served.cascade
        if cascade is None:
            raise RequestError(
                400,
                f"path {served.name!r} has no cascade built; rebuild its bundle with "
                "`modeconn serve-build DIR --cascade 8`, or use mode 'ensemble' with k in "
                f"{sorted(served.ensembles)}",
                {"mode": ["ensemble", "merged"]},
            )
        if t is not None:
            raise RequestError(
                400,
                f"t selects a merged model; a cascade's members are fixed (t = "
                f"{_fmt(cascade.ts)}, in the order they run): drop t",
                {"k": list(range(1, cascade.k + 1))},
            )
        k = cascade.k if k is None else k
        if not 1 <= k <= cascade.k:
            raise RequestError(
                400,
                f"k={k}: the cascade of path {served.name!r} has {cascade.k} members; k is how "
                f"many it may run at most, 1 to {cascade.k}",
                {"k": list(range(1, cascade.k + 1))},
            )
        if threshold is None and rule not in (None, cascade.rule):
            raise RequestError(
                400,
                f"rule {rule!r} needs its own threshold (the bundle's is for {cascade.rule!r}): "
                "give threshold as well",
                {"threshold": ["confidence: a probability in [0, 1]", "agree: an integer >= 2"]},
            )
        try:
            stop = StopRule(
                rule or cascade.rule,  # type: ignore[arg-type]  # the schema's literal
                cascade.threshold if threshold is None else threshold,
            )
        except ValueError as err:
            raise RequestError(400, str(err), {"rule": list(RULES)}) from None
        members = tuple(
            self._in_precision(served, served.merged[_served_t(t, served.merged)], precision)
            for t in cascade.ts[:k]
        )
        return CascadeRun(members, stop)

    def _select(self, served: ServedPath, mode: str, k: int | None, t: float | None) -> Graph:
        if mode == "ensemble":
            ks = sorted(served.ensembles)
            if t is not None:
                raise RequestError(
                    400,
                    "t selects a merged model; an ensemble's members are fixed by k "
                    f"(drop t, or use mode 'merged' with t in {_fmt(sorted(served.merged))})",
                    {"k": ks},
                )
            if not ks:
                raise RequestError(
                    400,
                    f"path {served.name!r} has no ensemble built; use mode 'merged' with t in "
                    f"{_fmt(sorted(served.merged))}",
                    {"mode": ["merged"], "t": sorted(served.merged)},
                )
            k = ks[-1] if k is None else k
            if k not in served.ensembles:
                raise RequestError(
                    400,
                    f"k={k} is not served for path {served.name!r}; available ensemble sizes: {ks}",
                    {"k": ks},
                )
            return served.ensembles[k]
        ts = sorted(served.merged)
        if k is not None and k != 1:
            raise RequestError(
                400,
                f"k={k} selects an ensemble; mode {mode!r} runs one network (drop k, or use "
                f"mode 'ensemble' with k in {sorted(served.ensembles)})",
                {"k": [1]},
            )
        if not ts:
            raise RequestError(
                400,
                f"path {served.name!r} has no merged model built; use mode 'ensemble' with k in "
                f"{sorted(served.ensembles)}",
                {"mode": ["ensemble"], "k": sorted(served.ensembles)},
            )
        if t is None:
            t = min(ts, key=lambda s: (abs(s - 0.5), s))
        if (served_t := match_t(t, ts)) is not None:
            return served.merged[served_t]
        raise RequestError(
            400,
            f"t={t:g} is not served for path {served.name!r}; served t values: {_fmt(ts)}",
            {"t": ts},
        )

    def shape_inputs(self, served: ServedPath, x: np.ndarray, raw: bool) -> np.ndarray:
        """``x`` as ``(N, *input_shape)``: accepts that shape or ``(N, prod(input_shape))``."""
        shape = served.input_shape
        size = math.prod(shape)
        if x.shape[1:] == shape:
            pass
        elif x.ndim == 2 and x.shape[1] == size:
            x = x.reshape(len(x), *shape)
        else:
            raise RequestError(
                400,
                f"inputs have shape {list(x.shape)}; path {served.name!r} expects "
                f"[N, {', '.join(map(str, shape))}] or [N, {size}]",
                {"input_shape": list(shape)},
            )
        if raw:
            try:
                x = normalize_raw(x, served.preprocessing, shape)
            except ValueError as err:
                raise RequestError(400, str(err), {"preprocessing": served.preprocessing}) from None
        return np.ascontiguousarray(x, dtype=np.float32)

    # -- answering ----------------------------------------------------------------------------

    def run(self, served: ServedPath, graph: Runner, x: np.ndarray) -> PredictResponse:
        """Run ``graph`` on ``x`` (already ``(N, *input_shape)``) and shape the answer."""
        if isinstance(graph, CascadeRun):
            return self._run_cascade(served, graph, x)
        model = graph.model
        outputs = graph.outputs(x)
        probs = outputs["probabilities"]  # (N, C)
        log_probs = outputs["log_probabilities"]  # (N, C)
        response = {
            "path": served.name,
            "mode": graph.mode,
            "k": graph.k,
            "ts": graph.ts,
            "precision": graph.entry.precision,
            "labels": probs.argmax(-1).tolist(),
            "probabilities": probs.tolist(),
            "provider": model.provider,
        }
        if "uncertainty" in outputs:
            uncertainty = outputs["uncertainty"]  # (N, 3): entropy, MI, disagreement
            response["entropy"] = uncertainty[:, 0].tolist()
            response["mutual_information"] = uncertainty[:, 1].tolist()
            response["disagreement"] = uncertainty[:, 2].tolist()
        else:
            response["entropy"] = _entropy(probs, log_probs).tolist()
        return PredictResponse.model_construct(**response)

    def _run_cascade(self, served: ServedPath, run: CascadeRun, x: np.ndarray) -> PredictResponse:
        result = run.run(x)
        response = {
            "path": served.name,
            "mode": "cascade",
            "k": run.k,
            "ts": run.ts,
            "precision": run.members[0].entry.precision,
            "labels": result.labels.tolist(),
            "probabilities": result.probs.astype(np.float32).tolist(),
            "entropy": result.entropy.tolist(),
            "mutual_information": result.mutual_information.tolist(),
            "disagreement": result.disagreement.tolist(),
            "members_used": result.members_used.tolist(),
            "stop_rule": run.rule.describe(),
            "provider": run.provider,
        }
        return PredictResponse.model_construct(**response)

    def predict(self, request: PredictRequest) -> PredictResponse:
        """Answer a validated prediction request."""
        return self.run(*self.resolve(request))

    def resolve(self, request: PredictRequest) -> tuple[ServedPath, Runner, np.ndarray]:
        """Path, graph and ``(N, *input_shape)`` inputs of a request, or a RequestError."""
        served = self.get(request.path)
        graph = self.graph(
            served,
            request.mode,
            request.k,
            request.t,
            request.rule,
            request.threshold,
            request.precision,
        )
        return served, graph, self.shape_inputs(served, request.array, request.raw)

    def predict_many(self, requests: Sequence[PredictRequest]) -> list[PredictResponse]:
        """Answer several requests, one graph run (or cascade) per distinct (path, graph)
        among them."""
        resolved = [self.resolve(r) for r in requests]
        groups: dict[Hashable, list[int]] = {}
        for i, (_, graph, _) in enumerate(resolved):
            groups.setdefault(graph.key, []).append(i)
        answers: dict[int, PredictResponse] = {}
        for members in groups.values():
            served, graph, _ = resolved[members[0]]
            x = np.concatenate([resolved[i][2] for i in members])  # (sum N_i, *input_shape)
            whole = self.run(served, graph, x)
            begin = 0
            for i in members:
                n = len(resolved[i][2])
                answers[i] = _slice(whole, begin, begin + n)
                begin += n
        return [answers[i] for i in range(len(requests))]

    def predict_image(
        self,
        data: bytes,
        path: str,
        mode: str = "ensemble",
        k: int | None = None,
        t: float | None = None,
        invert: bool | None = None,
        precision: str = "fp32",
    ) -> PredictResponse:
        """Answer an image upload: decode and preprocess it as the path's data set was."""
        served = self.get(path)
        graph = self.graph(served, mode, k, t, precision=precision)
        try:
            x = image_to_input(data, served.preprocessing, served.input_shape, invert=invert)
        except ValueError as err:
            raise RequestError(400, str(err)) from None
        return self.run(served, graph, x)

    def export(
        self, path: str, mode: str, k: int | None, t: float | None, precision: str = "fp32"
    ) -> tuple[Graph, str]:
        """The graph file to download and a descriptive file name for it."""
        served = self.get(path)
        if mode == "cascade":
            ts = served.cascade.ts if served.cascade else sorted(served.merged)
            raise RequestError(
                400,
                "a cascade is no single graph: its members are merged models, run one at a time; "
                f"download each with mode 'merged' and t in {_fmt(ts)}",
                {"mode": ["ensemble", "merged"], "t": ts},
            )
        graph = self._in_precision(served, self._select(served, mode, k, t), precision)
        graph.verified_file()  # also for an open graph: the file is what is sent
        stem = served.name.replace("/", "_").strip("._") or "path"
        return graph, f"{stem}_{graph.file.name}"


def _served_t(t: float, served: Iterable[float]) -> float:
    """The served t that ``t`` names (checked when the path was loaded)."""
    found = match_t(t, served)
    assert found is not None
    return found


def _slice(response: PredictResponse, begin: int, end: int) -> PredictResponse:
    """Rows ``begin:end`` of a batched answer."""
    fields = (
        "labels",
        "probabilities",
        "entropy",
        "mutual_information",
        "disagreement",
        "members_used",
    )
    data = {name: getattr(response, name) for name in PredictResponse.model_fields}
    for name in fields:
        if data[name] is not None:
            data[name] = data[name][begin:end]
    return PredictResponse.model_construct(**data)


def _load_path(name: str, directory: Path, device: Device, threads: int | None) -> ServedPath:
    index = read_index(directory)
    manifest = read_manifest(directory)
    if manifest.created != index.artifact_created:
        log.warning(
            "%s: the serving bundle was built from an older version of the artifact; rebuild "
            "it with `modeconn serve-build %s`",
            directory,
            directory,
        )
    ensembles: dict[int, Graph] = {}
    merged: dict[float, Graph] = {}
    copies: dict[str, Graph] = {}  # int8 graphs by file
    for g in index.graphs:
        graph = Graph(
            entry=g,
            file=directory / SERVING_DIR / g.file,  # a plain name (formats.ServedGraph)
            name=f"{name}/{g.file}",
            directory=directory,
            device=device,
            threads=threads,
        )
        if g.precision == "int8":
            copies[g.file] = graph
        elif g.mode == "ensemble":
            ensembles[g.k] = graph
        else:
            merged[float(g.ts[0])] = graph
    fp32 = [*ensembles.values(), *merged.values()]
    int8 = {g.entry.file: copies[f] for g in fp32 if (f := int8_file(g.entry.file)) in copies}
    if index.cascade is not None and any(match_t(t, merged) is None for t in index.cascade.ts):
        raise ValueError(f"{directory}: the cascade's members are not all graphs of the bundle")
    return ServedPath(
        name=name,
        directory=directory,
        index=index,
        manifest=manifest,
        ensembles=ensembles,
        merged=merged,
        cascade=index.cascade,
        int8=int8,
    )
