"""Every connection method on the same endpoints, side by side.

For two endpoint files: align once, fit each method (reusing an earlier fit of the same
endpoints, data and options), evaluate every path on the same grid of t, and collect one row
per method: barriers, worst test error, lengths in weights and in predictions, wall time, and
the K-member ensemble's test accuracy and NLL. The unaligned straight line is always included
as the baseline. :func:`compare_energy` does the same on an analytic landscape.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path as FsPath

import torch

from modeconn.checkpoint import Checkpoint
from modeconn.data import Dataset
from modeconn.evaluate import evaluate_energy_path
from modeconn.fit.configs import MethodConfig
from modeconn.fit.connect import connect
from modeconn.fit.methods import METHODS, make_config
from modeconn.models.spec import PermutationSpec
from modeconn.types import Energy

__all__ = ["ComparisonRow", "compare", "compare_energy", "DEFAULT_METHODS"]

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
    error_barrier: float  # test error, mean-endpoint definition
    worst_test_error: float
    weight_length: float
    prediction_length: float
    ensemble_k: int | None = None
    ensemble_acc: float | None = None
    ensemble_nll: float | None = None
    reused: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _cache_key(
    a: Checkpoint, b: Checkpoint, data: Dataset, method: str, config: dict, aligned, points: int
) -> str:
    blob = json.dumps(
        {
            "points": points,  # the evaluation stored with the fit
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
) -> tuple[list[ComparisonRow], dict[str, dict]]:
    """Fit and evaluate ``methods`` between ``a`` and ``b``; returns rows and evaluations by label.

    Artifacts go to ``out_dir/<label>``. With ``align`` every method connects A to the aligned
    B (permuted with ``spec``, default: inferred from the graph), and the unaligned straight line
    is added as the baseline.
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
            a, b, data, method, config.model_dump(), aligned and (spec or "inferred"), eval_points
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
            )
        ev = artifact.manifest.metrics
        ensemble = _ensemble_metrics(artifact, data, ensemble_k, device) if ensemble_k else {}
        rows.append(
            ComparisonRow(
                label=label,
                method=method,
                aligned=aligned,
                artifact=str(target),
                seconds=float(artifact.manifest.fit.get("seconds", 0.0)),
                loss_barrier=ev["loss_barrier"]["mean"],
                loss_barrier_max=ev["loss_barrier"]["max"],
                error_barrier=ev["error_barrier"]["mean"],
                worst_test_error=ev["worst_test_error"],
                weight_length=ev["weight_length"],
                prediction_length=ev["prediction_length"],
                reused=reused,
                **ensemble,
            )
        )
        evaluations[label] = ev
    return rows, evaluations


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
    """The same comparison on an analytic landscape: barrier, mean loss, length, time, work."""
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
        rows.append(
            {
                "method": method,
                "barrier": ev["barrier"]["mean"],
                "max_loss": ev["barrier"]["peak"],
                "mean_loss": ev["mean_loss"],
                "weight_length": ev["weight_length"],
                "seconds": seconds,
                "gradient_evaluations": stats.get("gradient_evaluations"),
            }
        )
    return rows
