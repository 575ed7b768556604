"""Batch evaluation of what a path offers, against what the endpoints alone give.

For one artifact, on a data split: endpoint A, endpoint B, the two-model ensemble of A and B,
the straight-line midpoint (BatchNorm reset), the path's midpoint (merged), and the path's
K-member ensembles for every K asked — or, for an FGE point set, its members and ensembles.
Each row reports accuracy, NLL, Brier score, ECE (15 bins) and member disagreement, computed by
torch or by onnxruntime on exported graphs (the same numbers, which the tests check): the
artifact's serving bundle's graphs where it holds the row's, graphs exported for the run
otherwise. One log line per artifact says what ran.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path as FsPath

import numpy as np
import torch
from torch import Tensor

from modeconn.artifact import PathArtifact
from modeconn.data import Dataset
from modeconn.ensemble import Ensemble, choose_ts
from modeconn.formats import ServingIndex
from modeconn.merge import as_artifact, merge_at, point_state
from modeconn.metrics import classification_metrics, reliability
from modeconn.paths import linear
from modeconn.types import StateDict

__all__ = ["Row", "evaluate_artifact", "BACKENDS"]

log = logging.getLogger("modeconn")

BACKENDS = ("torch", "onnx")


@dataclass(frozen=True)
class _Candidate:
    label: str
    group: str  # "endpoint", "pair", "midpoint", "ensemble"
    k: int
    ts: tuple[float, ...]
    states: tuple[StateDict, ...]
    on_path: bool = True  # the path's own points: a serving bundle may hold their graph


@dataclass(frozen=True)
class Row:
    label: str
    group: str
    k: int
    ts: tuple[float, ...]
    metrics: dict[str, float]
    reliability: dict[str, list[float]]

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "group": self.group,
            "k": self.k,
            "ts": list(self.ts),
            **self.metrics,
            "reliability": self.reliability,
        }


def _candidates(
    artifact: PathArtifact, data: Dataset, ks: Sequence[int], device
) -> list[_Candidate]:
    path = artifact.path
    x_train = artifact.bn_inputs(data.x_train)  # the subset the artifact recomputes BN from
    point = lambda t: merge_at(artifact, t, inputs=x_train, device=device)  # noqa: E731
    cands: list[_Candidate] = []
    if path.kind == "points":
        knots = [float(k) for k in path.knots()]
        first = point(knots[0])
        cands.append(_Candidate("FGE member 1", "endpoint", 1, (knots[0],), (first,)))
        sizes = sorted({k for k in ks if 2 <= k <= len(knots)} | {len(knots)})
        for k in sizes:
            ts = tuple(choose_ts(path, k))
            cands.append(
                _Candidate(f"FGE ensemble K={k}", "ensemble", k, ts, tuple(point(t) for t in ts))
            )
        return cands
    a, b = point(0.0), point(1.0)
    cands.append(_Candidate("endpoint A", "endpoint", 1, (0.0,), (a,)))
    cands.append(_Candidate("endpoint B", "endpoint", 1, (1.0,), (b,)))
    cands.append(_Candidate("A+B ensemble", "pair", 2, (0.0, 1.0), (a, b)))
    model = artifact.build_model()
    straight = linear(path.node(0), path.node(path.num_nodes - 1))
    mid_linear = point_state(model, straight, 0.5, inputs=x_train, device=device)
    cands.append(_Candidate("straight midpoint", "midpoint", 1, (0.5,), (mid_linear,), False))
    cands.append(_Candidate("path midpoint", "midpoint", 1, (0.5,), (point(0.5),)))
    for k in ks:
        ts = tuple(choose_ts(path, k))
        cands.append(
            _Candidate(f"path ensemble K={k}", "ensemble", k, ts, tuple(point(t) for t in ts))
        )
    return cands


def _member_probs_torch(artifact: PathArtifact, cand: _Candidate, x: Tensor, device) -> Tensor:
    ensemble = Ensemble(artifact.build_model(), list(cand.states), cand.ts, device=device)
    return ensemble.member_log_probs(x).exp()  # (K, N, C)


def _bundled(artifact: PathArtifact, cand: _Candidate, index: ServingIndex | None) -> bytes | None:
    """The bytes of the serving bundle's graph of ``cand`` (checked against the index), if any."""
    from modeconn.formats import IntegrityError, read_graph

    if index is None or artifact.directory is None or not cand.on_path:
        return None
    mode = "ensemble" if cand.group in ("ensemble", "pair") else "merged"
    graph = index.find(mode, cand.ts)
    if graph is None:
        return None
    try:
        return read_graph(artifact.directory, graph)
    except IntegrityError as err:
        log.warning(
            "%s: not using its serving bundle's %s: %s", artifact.directory, graph.file, err
        )
        return None


def _probs_onnx(
    artifact: PathArtifact, cand: _Candidate, x: Tensor, workdir: FsPath, bundled: bytes | None
) -> tuple[Tensor, float]:
    """Mean probabilities and mean disagreement from a graph run by onnxruntime: ``bundled``
    (the serving bundle's), else one exported to ``workdir``."""
    from modeconn.export import ENSEMBLE_OUTPUTS, EnsembleModule, export_onnx
    from modeconn.runtime import OnnxModel

    if bundled is not None:
        result = OnnxModel(bundled, name=cand.label, log_level=logging.DEBUG).run(
            x.numpy(), batch_size=1024
        )
        probs = torch.from_numpy(np.asarray(result["probabilities"], dtype=np.float64))
        # A merged model's graph has no uncertainty output: one member never disagrees.
        if "uncertainty" not in result:
            return probs, 0.0
        return probs, float(np.asarray(result["uncertainty"])[:, 2].mean())
    members = []
    for state in cand.states:
        member = artifact.build_model()
        member.load_state_dict(state, strict=True)
        members.append(member.eval())
    out = workdir / f"{cand.label.replace(' ', '_').replace('=', '')}.onnx"
    export_onnx(
        EnsembleModule(members),
        out,
        input_shape=artifact.manifest.model.input_shape,
        output_names=ENSEMBLE_OUTPUTS,
        manifest={"kind": "ensemble", "k": cand.k, "ts": list(cand.ts)},
        probe=x[:5],
        log_level=logging.DEBUG,
    )
    result = OnnxModel(out, name=cand.label, log_level=logging.DEBUG).run(
        x.numpy(), batch_size=1024
    )
    probs = torch.from_numpy(np.asarray(result["probabilities"], dtype=np.float64))
    return probs, float(np.asarray(result["uncertainty"])[:, 2].mean())


def evaluate_artifact(
    artifact: PathArtifact | str | os.PathLike,
    data: Dataset,
    ks: Sequence[int] = (2, 4, 8),
    *,
    split: str = "test",
    backend: str = "torch",
    device: torch.device | str | None = None,
) -> list[Row]:
    """Every row described in the module docstring, evaluated on ``data``'s ``split``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    bad = [k for k in ks if not isinstance(k, int) or k < 1]
    if bad:
        raise ValueError(f"ensemble sizes must be positive integers, got {bad}")
    from modeconn.serving import current_index

    begin = time.perf_counter()
    artifact = as_artifact(artifact)
    x, y = data.split(split)
    rows: list[Row] = []
    index = None
    if backend == "onnx" and artifact.directory is not None:
        index = current_index(artifact.directory)
    reused = 0
    with tempfile.TemporaryDirectory(prefix="modeconn-eval-") as tmp:
        for cand in _candidates(artifact, data, ks, device):
            if backend == "torch":
                member = _member_probs_torch(artifact, cand, x, device).double()  # (K, N, C)
                probs = member.mean(0)  # (N, C)
                metrics = classification_metrics(probs, y, member)
            else:
                bundled = _bundled(artifact, cand, index)
                reused += bundled is not None
                probs, disagreement = _probs_onnx(artifact, cand, x, FsPath(tmp), bundled)
                metrics = {**classification_metrics(probs, y), "disagreement": disagreement}
            rows.append(
                Row(cand.label, cand.group, cand.k, cand.ts, metrics, reliability(probs, y))
            )
            log.debug("%s: acc %.4f nll %.4f", cand.label, metrics["accuracy"], metrics["nll"])
    how = backend
    if backend == "onnx":
        how += f", {reused} of {len(rows)} graphs from the serving bundle"
    log.info(
        "evaluated %s: %d rows on the %s set (%s) in %.1fs",
        artifact.directory or artifact.name or artifact.manifest.method,
        len(rows),
        split,
        how,
        time.perf_counter() - begin,
    )
    return rows
