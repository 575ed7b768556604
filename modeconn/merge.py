"""Merged models: the network at one point ``t`` of a path, as a plain state dict.

A point on a low-loss path is itself a good network (Garipov et al. 2018, arXiv 1802.10026;
Tan et al. 2023 serve the geodesic midpoint the same way). Its parameters come from the path;
a BatchNorm model also needs running statistics *for those weights*: either the ones stored in
the artifact for a served t, or recomputed on training inputs (a cumulative average, see
:func:`modeconn.bn.recompute_bn`). The result has exactly the keys of the original
architecture's ``state_dict()``, so it loads with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch
from torch import Tensor, nn

from modeconn.artifact import PathArtifact, load_artifact
from modeconn.bn import has_batchnorm, recompute_bn
from modeconn.checkpoint import save_checkpoint
from modeconn.paths import Path, as_state
from modeconn.types import StateDict

__all__ = [
    "point_state",
    "merge_at",
    "merged_model",
    "save_merged",
    "as_artifact",
    "resolve_bn",
]

log = logging.getLogger("modeconn")

BnSource = Literal["none", "stored", "recomputed"]


def as_artifact(artifact: PathArtifact | str | os.PathLike) -> PathArtifact:
    """``artifact`` itself, or the artifact loaded from a directory."""
    if isinstance(artifact, PathArtifact):
        return artifact
    if isinstance(artifact, str | os.PathLike):
        return load_artifact(artifact)
    raise TypeError(
        f"expected a PathArtifact or an artifact directory, got {type(artifact).__name__}"
    )


def _check_t(t: float) -> float:
    try:
        value = float(t)
    except (TypeError, ValueError) as err:
        raise TypeError(f"t must be a number in [0, 1], got {t!r}") from err
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"t must lie in [0, 1], got {t!r}")
    return value


def point_state(
    model: nn.Module,
    path: Path,
    t: float,
    *,
    inputs: Tensor | None = None,
    buffers: StateDict | None = None,
    device: torch.device | str | None = None,
) -> StateDict:
    """The full state dict of ``model``'s architecture at ``path(t)``, on the CPU.

    Parameters come from the path. For a BatchNorm model the running statistics are
    ``buffers`` when given, else recomputed on ``inputs`` (training inputs, unaugmented);
    one of them is required. Keys and order are those of ``model.state_dict()``.
    """
    t = _check_t(t)
    params = {k: v.detach() for k, v in as_state(path.at(t)).items()}  # each (*param_shape)
    stats: StateDict = {}
    if has_batchnorm(model):
        if buffers is not None:
            stats = dict(buffers)
        elif inputs is not None:
            model.to(device or "cpu")
            stats = recompute_bn(model, params, inputs, device=device)
            model.cpu()
        else:
            raise ValueError(
                f"{type(model).__name__} has BatchNorm: the point at t={t} needs running "
                "statistics, so give stored buffers or training inputs to recompute them"
            )
    merged = {**params, **stats}
    reference = model.state_dict()
    missing = [k for k in reference if k not in merged]
    extra = [k for k in merged if k not in reference]
    if missing or extra:
        raise ValueError(
            f"the state at t={t} does not fit {type(model).__name__}: "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    out: StateDict = {}
    for key, ref in reference.items():
        value = merged[key].detach().to("cpu")
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(
                f"{key!r} at t={t} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(ref.shape)}"
            )
        out[key] = value.to(ref.dtype).contiguous().clone()
    return out


BnChoice = Literal["auto", "stored", "recompute"]
_BN_CHOICES = ("auto", "stored", "recompute")


def resolve_bn(
    artifact: PathArtifact,
    t: float,
    *,
    inputs: Tensor | None = None,
    bn: BnChoice = "auto",
    model: nn.Module | None = None,
) -> tuple[StateDict | None, BnSource]:
    """Which BatchNorm statistics the point at ``t`` uses: ``(stored buffers or None, source)``.

    ``bn="auto"``: the artifact's stored statistics when ``t`` is a served t, else recomputed on
    ``inputs``; ``"stored"``: stored only; ``"recompute"``: always recomputed on ``inputs``.
    Raises ``ValueError`` (naming the served t values and the data to pass) when neither is
    possible. A model without BatchNorm needs nothing: ``(None, "none")``.
    """
    if bn not in _BN_CHOICES:
        raise ValueError(f"bn must be one of {_BN_CHOICES}, got {bn!r}")
    model = model or artifact.build_model()
    if not has_batchnorm(model):
        return None, "none"
    served = artifact.served_t(t)
    stored = artifact.buffers.get(served) if served is not None else None
    if bn != "recompute" and stored is not None:
        return stored, "stored"
    if bn != "stored" and inputs is not None:
        return None, "recomputed"
    data = artifact.manifest.data.name if artifact.manifest.data else "the training data"
    served_ts = [round(s, 4) for s in artifact.manifest.served_ts]
    if bn == "recompute":
        raise ValueError(
            f"recomputing BatchNorm statistics at t={t} needs training inputs (CLI: --data {data})"
        )
    raise ValueError(
        f"t={t} has no stored BatchNorm statistics in this artifact (served t values: "
        f"{served_ts}); give training inputs to recompute them (CLI: --data {data})"
    )


def merge_at(
    artifact: PathArtifact | str | os.PathLike,
    t: float = 0.5,
    *,
    inputs: Tensor | None = None,
    bn: BnChoice = "auto",
    device: torch.device | str | None = None,
) -> StateDict:
    """The merged network at ``t`` (default: the midpoint) as a plain state dict.

    BatchNorm statistics follow ``bn`` (see :func:`resolve_bn`): by default the ones the
    artifact stored for a served t, otherwise recomputed on ``inputs`` (training inputs; the
    subset the artifact records, see :meth:`PathArtifact.bn_inputs`). Load the result with
    ``artifact.build_model().load_state_dict(state, strict=True)``.
    """
    artifact = as_artifact(artifact)
    t = _check_t(t)
    model = artifact.build_model()
    buffers, source = resolve_bn(artifact, t, inputs=inputs, bn=bn, model=model)
    # The artifact's own subset of the inputs, so that every consumer recomputes the same.
    recompute_from = (
        artifact.bn_inputs(inputs) if source == "recomputed" and inputs is not None else None
    )
    return point_state(
        model,
        artifact.path,
        t,
        inputs=recompute_from,
        buffers=buffers,
        device=device,
    )


def merged_model(
    artifact: PathArtifact | str | os.PathLike,
    t: float = 0.5,
    *,
    inputs: Tensor | None = None,
    bn: BnChoice = "auto",
    device: torch.device | str | None = None,
) -> nn.Module:
    """The registry's model loaded (strictly) with :func:`merge_at`'s state, in eval mode."""
    artifact = as_artifact(artifact)
    model = artifact.build_model()
    state = merge_at(artifact, t, inputs=inputs, bn=bn, device=device)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_merged(
    out: str | os.PathLike,
    artifact: PathArtifact | str | os.PathLike,
    t: float = 0.5,
    *,
    state: StateDict | None = None,
    inputs: Tensor | None = None,
    bn: BnChoice = "auto",
    device: torch.device | str | None = None,
) -> StateDict:
    """Write the merged network at ``t`` as an endpoint checkpoint (safetensors, atomic).

    The file describes itself like one written by ``modeconn train``, so every command that
    takes an endpoint reads it. Returns the state dict written.
    """
    artifact = as_artifact(artifact)
    t = _check_t(t)
    model = artifact.build_model()
    _, source = resolve_bn(artifact, t, inputs=inputs, bn=bn, model=model)
    if state is None:
        state = merge_at(artifact, t, inputs=inputs, bn=bn, device=device)
    manifest = artifact.manifest
    model.load_state_dict(state, strict=True)  # refuse to write a state that does not fit
    meta = {
        "data": manifest.data.name if manifest.data else None,
        "data_fingerprint": manifest.data.fingerprint if manifest.data else "",
        "seed": manifest.seed,
        "merged": {
            "path": artifact.name,
            "method": manifest.method,
            "basis": manifest.basis,
            "t": t,
            "bn": source,
        },
    }
    save_checkpoint(out, model, state=state, **meta)
    log.info("wrote merged model at t=%g of %s to %s", t, artifact.name or manifest.method, out)
    return state
