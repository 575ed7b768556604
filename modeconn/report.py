"""Batch evaluation of what a path offers, against what the endpoints alone give.

For one artifact, on a data split: endpoint A, endpoint B, the two-model ensemble of A and B,
the straight-line midpoint (BatchNorm reset), the path's midpoint (merged), and the path's
K-member ensembles for every K asked — or, for an FGE point set, its members and ensembles.
Each row reports accuracy, NLL, Brier score, ECE (15 bins) and member disagreement, computed by
torch or by onnxruntime on exported graphs (the same numbers, which the tests check).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path as FsPath

import numpy as np
import torch
from torch import Tensor

from modeconn.artifact import PathArtifact
from modeconn.data import Dataset
from modeconn.ensemble import Ensemble, choose_ts
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
    x_train = data.x_train
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
    cands.append(_Candidate("straight midpoint", "midpoint", 1, (0.5,), (mid_linear,)))
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


def _probs_onnx(
    artifact: PathArtifact, cand: _Candidate, x: Tensor, workdir: FsPath
) -> tuple[Tensor, float]:
    """Mean probabilities and mean disagreement from an exported graph run by onnxruntime."""
    from modeconn.export import ENSEMBLE_OUTPUTS, EnsembleModule, export_onnx
    from modeconn.runtime import OnnxModel

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
    )
    result = OnnxModel(out, name=cand.label).run(x.numpy(), batch_size=1024)
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
    artifact = as_artifact(artifact)
    x, y = data.split(split)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="modeconn-eval-") as tmp:
        for cand in _candidates(artifact, data, ks, device):
            if backend == "torch":
                member = _member_probs_torch(artifact, cand, x, device).double()  # (K, N, C)
                probs = member.mean(0)  # (N, C)
                metrics = classification_metrics(probs, y, member)
            else:
                probs, disagreement = _probs_onnx(artifact, cand, x, FsPath(tmp))
                metrics = {**classification_metrics(probs, y), "disagreement": disagreement}
            rows.append(
                Row(cand.label, cand.group, cand.k, cand.ts, metrics, reliability(probs, y))
            )
            log.debug("%s: acc %.4f nll %.4f", cand.label, metrics["accuracy"], metrics["nll"])
    return rows
