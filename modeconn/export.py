"""Export ensembles and merged models along a path to ONNX (or the merged weights to safetensors).

An ensemble becomes **one** graph that holds all K members (DESIGN.md, Serving): a small module
runs each member in a plain loop (``torch.func.vmap`` over stacked parameters exports with a
silently fixed batch size for BatchNorm/MaxPool models) and combines their softmax with
:func:`modeconn.ensemble.ensemble_statistics`. Outputs, by name:

* ensemble: ``probabilities`` (N, C), ``uncertainty`` (N, 3: entropy, mutual information,
  disagreement), ``log_probabilities`` (N, C, for an NLL without underflow);
* merged model: ``probabilities`` (N, C), ``log_probabilities`` (N, C).

The batch axis is dynamic and checked to be symbolic. After export the graph is run with
onnxruntime on a probe batch of another size and compared with torch (max abs difference
<= 1e-4, else ``RuntimeError``); only then is the file written, atomically, with every weight
inside it and a JSON manifest in its metadata (:data:`modeconn.runtime.METADATA_KEY`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeconn.artifact import PathArtifact, library_versions
from modeconn.ensemble import UNCERTAINTY, Ensemble, Spacing, ensemble_statistics
from modeconn.io import atomic_file
from modeconn.merge import BnChoice, as_artifact, merge_at, resolve_bn, save_merged
from modeconn.runtime import METADATA_KEY

__all__ = [
    "ENSEMBLE_OUTPUTS",
    "MERGED_OUTPUTS",
    "INPUT_NAME",
    "EnsembleModule",
    "MergedModule",
    "ExportResult",
    "export_ensemble",
    "export_merged",
    "export_onnx",
]

log = logging.getLogger("modeconn")

INPUT_NAME = "input"
ENSEMBLE_OUTPUTS = ("probabilities", "uncertainty", "log_probabilities")
MERGED_OUTPUTS = ("probabilities", "log_probabilities")
FORMAT = "modeconn.onnx/1"
_EXAMPLE_BATCH = 2  # the batch size traced at export; the probe uses another one
_PROBE_BATCH = 5
#: The relative part of the export check: abs(ort - torch) <= atol + RTOL * abs(torch).
RTOL = 1e-5
_PROTOBUF_LIMIT = 2**31 - 1


class EnsembleModule(nn.Module):
    """K member networks in one module: mean softmax and per-input uncertainty."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # A plain loop: every member becomes its own branch of the graph. Their logits are
        # joined once and normalised by one LogSoftmax: few nodes matter at batch size 1.
        logits = torch.cat([m(x) for m in self.members], dim=-1)  # (N, K*C)
        k = len(self.members)
        member = F.log_softmax(logits.reshape(-1, k, logits.shape[-1] // k), dim=-1)  # (N, K, C)
        mean, log_mean, uncertainty = ensemble_statistics(member, dim=1)  # (N, C) x2, (N, 3)
        return mean, uncertainty, log_mean


class MergedModule(nn.Module):
    """One network: probabilities and log-probabilities."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_probs = F.log_softmax(self.model(x), dim=-1)  # (N, C)
        return log_probs.exp(), log_probs


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well onnxruntime agreed with torch."""

    path: FsPath
    format: str
    manifest: dict = field(default_factory=dict)
    max_abs_diff: float | None = None  # onnxruntime vs torch on the probe batch
    seconds: float = 0.0
    size_bytes: int = 0


def export_onnx(
    module: nn.Module,
    out: str | os.PathLike,
    *,
    input_shape: Sequence[int],
    output_names: Sequence[str],
    manifest: dict,
    probe: Tensor | None = None,
    atol: float = 1e-4,
    log_level: int = logging.INFO,
) -> ExportResult:
    """Export ``module`` (inputs ``(N, *input_shape)``) as one self-contained ONNX file.

    The batch axis is dynamic (checked). Before anything is written, onnxruntime runs the graph
    on ``probe`` (default: 5 seeded random inputs) and every output must match torch within
    ``atol``; otherwise ``RuntimeError`` and no file. ``manifest`` goes, as JSON, into the
    model's metadata under :data:`modeconn.runtime.METADATA_KEY`. The file written is logged at
    ``log_level`` (DEBUG for graphs written only to be run once).
    """
    if not atol >= 0:
        raise ValueError(f"atol must be a non-negative number, got {atol!r}")
    _check_out(out)
    begin = time.perf_counter()
    input_shape = tuple(int(d) for d in input_shape)
    module = module.cpu().eval()
    if probe is None:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(_PROBE_BATCH, *input_shape, generator=gen)  # (5, *input_shape)
    probe = probe.detach().to("cpu", torch.float32)
    if tuple(probe.shape[1:]) != input_shape or len(probe) == 0:
        raise ValueError(
            f"probe inputs have shape {list(probe.shape)}, expected [N, {list(input_shape)}]"
        )
    example_batch = _EXAMPLE_BATCH if len(probe) != _EXAMPLE_BATCH else _EXAMPLE_BATCH + 1
    example = torch.zeros(example_batch, *input_shape)  # (B, *input_shape)

    proto = _trace(module, example, output_names)
    _check_dynamic_batch(proto)
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise ValueError(
            f"the model is {proto.ByteSize() / 2**30:.2f} GiB: over the 2 GiB limit of a "
            "single-file ONNX model; export fewer members"
        )
    manifest = {
        **manifest,
        "input_name": INPUT_NAME,
        "input_shape": list(input_shape),
        "outputs": list(output_names),
        "opset": next((o.version for o in proto.opset_import if o.domain == ""), None),
    }
    with torch.no_grad():
        expected = [t.numpy() for t in module(probe)]
    excused = _near_ties(module, probe) if isinstance(module, EnsembleModule) else None
    diff = _compare(proto, probe, expected, output_names, atol, excused)
    manifest["check"] = {"probe_batch": len(probe), "max_abs_diff": diff, "atol": atol}
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(manifest, sort_keys=True)
    proto.doc_string = f"modeconn {manifest.get('kind', 'model')} of path {manifest.get('path')!r}"
    data = proto.SerializeToString()
    out = FsPath(out)
    with atomic_file(out) as tmp:
        tmp.write_bytes(data)
    seconds = time.perf_counter() - begin
    log.log(log_level, "wrote %s (%.1f MB, max |onnx - torch| = %.2g)", out, len(data) / 1e6, diff)
    return ExportResult(
        path=out,
        format="onnx",
        manifest=manifest,
        max_abs_diff=diff,
        seconds=seconds,
        size_bytes=len(data),
    )


#: Loggers of the exporter's passes; at INFO they print hundreds of lines per export.
_NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_out(out: str | os.PathLike, suffix: str = ".onnx") -> None:
    path = FsPath(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as model{suffix}")
    if path.suffix != suffix:  # a .pt name would promise a torch checkpoint it does not hold
        raise ValueError(
            f"--out {out}: this writes a {suffix[1:]} file; name it {path.with_suffix(suffix).name}"
        )


def _trace(module: nn.Module, example: Tensor, output_names: Sequence[str]):
    """``torch.onnx.export`` (dynamo) with a dynamic batch axis, quietly; the ModelProto."""
    batch = torch.export.Dim("batch")
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                external_data=False,
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
        except Exception as err:  # torch.export raises many error types
            raise RuntimeError(f"ONNX export failed: {type(err).__name__}: {err}") from err
    if program is None:  # only the legacy exporter (dynamo=False) returns None
        raise RuntimeError("ONNX export returned no program")
    return program.model_proto


def _check_dynamic_batch(proto) -> None:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        fixed = dims[0].dim_value if dims else "?"
        raise RuntimeError(
            f"the exported graph fixed the batch size to {fixed} instead of a symbolic axis; "
            "the model specialises on the batch size and cannot be served at other sizes"
        )


def _compare(
    proto,
    probe: Tensor,
    expected: list,
    output_names: Sequence[str],
    atol: float,
    excused=None,
) -> float:
    """Max abs difference between onnxruntime (CPU) and torch over every output; each value
    may differ by ``atol + RTOL * |torch|`` (log-probabilities of unlikely classes are large
    numbers, whose float32 rounding alone exceeds a fixed ``atol``); ``atol = 0`` asks for
    equality."""
    import numpy as np

    from modeconn.runtime import open_session

    session = open_session(
        proto.SerializeToString(), device="cpu", name="exported graph", log_level=logging.DEBUG
    )
    # Dense tensors: the graphs exported here have no sequence, map or sparse outputs.
    got = cast(list[np.ndarray], session.run(list(output_names), {INPUT_NAME: probe.numpy()}))
    worst = 0.0
    for name, value, ref in zip(output_names, got, expected):
        if value.shape != ref.shape:
            raise RuntimeError(
                f"onnxruntime output {name!r} has shape {list(value.shape)}, torch {list(ref.shape)}"
            )
        delta = np.abs(value.astype(np.float64) - ref.astype(np.float64))
        if name == "uncertainty" and excused is not None:
            # Disagreement counts label flips: a member whose top two classes tie to within
            # float rounding may flip between runtimes. Only such inputs are excused.
            delta[:, 2] = np.where(excused, 0.0, delta[:, 2])
        if not np.isfinite(delta).all():
            raise RuntimeError(f"onnxruntime output {name!r} differs from torch by NaN/inf")
        worst = max(worst, float(delta.max(initial=0.0)))
        allowed = atol + RTOL * np.abs(ref.astype(np.float64)) if atol > 0 else 0.0
        if (delta > allowed).any():
            where = np.unravel_index(int(np.argmax(delta - allowed)), delta.shape)
            raise RuntimeError(
                f"onnxruntime disagrees with torch on output {name!r}: difference "
                f"{float(delta[where]):.3g} where torch gives {float(ref[where]):.4g}, over "
                f"{atol:g} + {RTOL:g} x |torch|, on a probe batch of {len(probe)}; nothing "
                "was written"
            )
    return worst


@torch.no_grad()
def _near_ties(module: EnsembleModule, probe: Tensor, gap: float = 1e-4):
    """Inputs where some member's two best classes are within ``gap``: (N,) bool array."""
    member = torch.stack([F.log_softmax(m(probe), -1) for m in module.members])  # (K, N, C)
    top2 = member.topk(min(2, member.shape[-1]), dim=-1).values  # (K, N, 2)
    return ((top2[..., 0] - top2[..., -1]) < gap).any(dim=0).numpy()  # (N,)


def _manifest(artifact: PathArtifact, kind: str) -> dict:
    m = artifact.manifest
    data = m.data
    return {
        "format": FORMAT,
        "kind": kind,
        "path": artifact.name or m.method,
        "method": m.method,
        "basis": m.basis,
        "num_nodes": m.num_nodes,
        "model": {"name": m.model.name, "kwargs": m.model.kwargs},
        "num_classes": m.model.num_classes,
        "preprocessing": dict(data.preprocessing) if data else {},
        "data": {"name": data.name, "fingerprint": data.fingerprint} if data else None,
        "alignment": bool(m.alignment),
        "bn_examples": m.bn_examples,  # training inputs recomputed BN statistics come from
        "artifact_created": m.created,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
    }


def _versions() -> dict:
    import onnx

    return {**library_versions(), "onnx": onnx.__version__}


def export_ensemble(
    artifact: PathArtifact | str | os.PathLike,
    out: str | os.PathLike,
    k: int | None = None,
    *,
    ts: Sequence[float] | None = None,
    spacing: Spacing = "t",
    inputs: Tensor | None = None,
    bn: BnChoice = "auto",
    probe: Tensor | None = None,
    atol: float = 1e-4,
    device: torch.device | str | None = None,
    log_level: int = logging.INFO,
) -> ExportResult:
    """Write the K-member ensemble along ``artifact``'s path as one ONNX graph.

    Members are chosen as in :func:`modeconn.ensemble.choose_ts`; BatchNorm statistics per
    member as in :func:`modeconn.merge.resolve_bn` (stored, or recomputed on ``inputs``).
    """
    _check_out(out)
    artifact = as_artifact(artifact)
    ensemble = Ensemble.from_artifact(
        artifact, k, ts=ts, spacing=spacing, inputs=inputs, bn=bn, device=device
    )
    module = EnsembleModule([m.cpu() for m in ensemble.members])
    manifest = {
        **_manifest(artifact, "ensemble"),
        "k": ensemble.k,
        "ts": list(ensemble.ts),
        "spacing": "given" if ts is not None else spacing,
        "bn": list(ensemble.bn_sources),
        "uncertainty": list(UNCERTAINTY),
        "combine": "mean of member softmax",
    }
    return export_onnx(
        module,
        out,
        input_shape=artifact.manifest.model.input_shape,
        output_names=ENSEMBLE_OUTPUTS,
        manifest=manifest,
        probe=probe,
        atol=atol,
        log_level=log_level,
    )


def export_merged(
    artifact: PathArtifact | str | os.PathLike,
    out: str | os.PathLike,
    t: float = 0.5,
    *,
    format: Literal["onnx", "safetensors"] = "onnx",
    inputs: Tensor | None = None,
    bn: BnChoice = "auto",
    probe: Tensor | None = None,
    atol: float = 1e-4,
    device: torch.device | str | None = None,
    log_level: int = logging.INFO,
) -> ExportResult:
    """Write the merged model at ``t``: an ONNX graph, or (``format="safetensors"``) an
    endpoint checkpoint that every ``modeconn`` command reads like a trained endpoint."""
    if format not in ("onnx", "safetensors"):
        raise ValueError(f"format must be 'onnx' or 'safetensors', got {format!r}")
    _check_out(out, f".{format}")
    artifact = as_artifact(artifact)
    begin = time.perf_counter()
    model = artifact.build_model()
    state = merge_at(artifact, t, inputs=inputs, bn=bn, device=device)
    _, source = resolve_bn(artifact, float(t), inputs=inputs, bn=bn, model=model)
    if format == "safetensors":
        save_merged(out, artifact, t, state=state, inputs=inputs, bn=bn)
        out = FsPath(out)
        return ExportResult(
            path=out,
            format="safetensors",
            manifest={"kind": "merged", "t": float(t), "bn": source},
            seconds=time.perf_counter() - begin,
            size_bytes=out.stat().st_size,
        )
    model.load_state_dict(state, strict=True)
    manifest = {**_manifest(artifact, "merged"), "k": 1, "ts": [float(t)], "bn": [source]}
    return export_onnx(
        MergedModule(model.eval()),
        out,
        input_shape=artifact.manifest.model.input_shape,
        output_names=MERGED_OUTPUTS,
        manifest=manifest,
        probe=probe,
        atol=atol,
        log_level=log_level,
    )
