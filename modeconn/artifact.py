"""Path artifacts: a directory that holds one fitted path (or FGE point set) and describes it.

``manifest.json`` (validated by :class:`Manifest`), ``nodes.safetensors`` (the stacked nodes,
parameters only, keyed like ``model.state_dict()`` with a leading node axis) and, for BatchNorm
models, ``buffers.safetensors`` (running statistics recomputed at each served t, keyed
``t{index}/{buffer name}``). Written to a temporary directory and renamed, so a crash never
leaves half an artifact; nothing is unpickled when reading.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from modeconn.bn import has_batchnorm, recompute_bn
from modeconn.checkpoint import ModelSpec
from modeconn.io import atomic_dir, load_tensors, save_tensors
from modeconn.paths import PATH_KINDS, Path, PolyChain
from modeconn.types import StateDict

__all__ = [
    "FORMAT_VERSION",
    "Manifest",
    "PathArtifact",
    "save_artifact",
    "load_artifact",
    "default_served_ts",
    "library_versions",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NODES = "nodes.safetensors"
BUFFERS = "buffers.safetensors"


def default_served_ts(max_k: int = 8) -> list[float]:
    """The t values whose BN statistics an artifact stores by default.

    The union of K evenly spaced points (endpoints included) for K = 2..max_k, plus the
    midpoint: every default ensemble and the default merge can then be served without data.
    """
    ts = {0.5}
    for k in range(2, max_k + 1):
        ts.update(round(i / (k - 1), 6) for i in range(k))
    return sorted(ts)


def library_versions() -> dict[str, str]:
    import numpy
    import pydantic

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pydantic": pydantic.__version__,
    }


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Strict):
    name: str
    input_shape: list[int]
    num_classes: int = Field(ge=2)
    kwargs: dict = {}


class DataInfo(_Strict):
    name: str
    fingerprint: str = ""
    input_shape: list[int] = []
    num_classes: int = 0
    train_size: int = 0
    test_size: int = 0
    preprocessing: dict = {}


class Manifest(_Strict):
    """Everything a consumer needs to know about a path artifact, validated on load."""

    format_version: Literal[1] = FORMAT_VERSION
    kind: Literal["path", "points"] = "path"
    method: str
    basis: Literal["bezier", "polychain", "points"]
    num_nodes: int = Field(ge=1)
    knots: list[float]
    model: ModelInfo
    data: DataInfo | None = None
    alignment: dict | None = None
    endpoints: dict = {}
    served_ts: list[float] = []
    metrics: dict = {}
    fit: dict = {}
    seed: int = 0
    versions: dict = {}
    created: str = ""

    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_json(self.model.model_dump())


@dataclass
class PathArtifact:
    """A loaded (or about to be saved) artifact: manifest, path and BN buffers per served t."""

    manifest: Manifest
    path: Path
    buffers: dict[float, StateDict] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest.fit.get("name", "")

    def build_model(self) -> nn.Module:
        return self.manifest.model_spec().build()

    def served_t(self, t: float) -> float | None:
        """The served t value within 1e-6 of ``t``, if any."""
        for served in self.manifest.served_ts:
            if abs(served - t) <= 1e-6:
                return served
        return None

    def state_at(self, t: float, model: nn.Module | None = None) -> StateDict:
        """A full state dict at ``t``: parameters on the path plus its stored BN statistics.

        For a BatchNorm model ``t`` must be one of the served t values (their statistics were
        recomputed on training data when the artifact was written); see
        :func:`modeconn.merge.merge_at` to recompute them at any other t.
        """
        model = model or self.build_model()
        params = self.path.at(t)
        if not has_batchnorm(model):
            return dict(params)
        served = self.served_t(t)
        if served is None or served not in self.buffers:
            raise ValueError(
                f"t={t} has no stored BatchNorm statistics in this artifact; served t values: "
                f"{[round(s, 4) for s in self.manifest.served_ts]} (or recompute them with data)"
            )
        return {**params, **self.buffers[served]}


def compute_served_buffers(
    model: nn.Module,
    path: Path,
    inputs: torch.Tensor,
    ts: list[float],
    *,
    device: torch.device | str | None = None,
) -> dict[float, StateDict]:
    """BN statistics at every t in ``ts`` (``{}`` for a BN-free model)."""
    if not has_batchnorm(model):
        return {}
    model.to(device or "cpu")
    return {
        t: {k: v.cpu() for k, v in recompute_bn(model, path.at(t), inputs, device=device).items()}
        for t in ts
    }


def save_artifact(directory: str | os.PathLike, artifact: PathArtifact) -> FsPath:
    """Write ``artifact`` to ``directory`` atomically (an existing one is replaced whole)."""
    directory = FsPath(directory)
    manifest = artifact.manifest
    updates = {}
    if not manifest.created:
        updates["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if not manifest.versions:
        updates["versions"] = library_versions()
    if updates:
        manifest = manifest.model_copy(update=updates)
        artifact.manifest = manifest
    with atomic_dir(directory) as tmp:
        save_tensors(tmp / NODES, artifact.path.nodes, {"format": "modeconn.nodes/1"})
        if artifact.buffers:
            index = {f"{i}": t for i, t in enumerate(artifact.buffers)}
            flat = {
                f"t{i}/{key}": value
                for i, t in enumerate(artifact.buffers)
                for key, value in artifact.buffers[t].items()
            }
            save_tensors(tmp / BUFFERS, flat, {"format": "modeconn.buffers/1", "ts": index})
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return directory


def load_artifact(directory: str | os.PathLike) -> PathArtifact:
    """Read and check an artifact written by :func:`save_artifact`."""
    directory = FsPath(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"artifact directory not found: {directory}")
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        raise ValueError(f"{directory} is not a modeconn artifact: it has no {MANIFEST}")
    try:
        manifest = Manifest.model_validate_json(manifest_file.read_text())
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5]
        )
        raise ValueError(f"{manifest_file} is not a valid manifest: {problems}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {manifest_file}: {err}") from err

    nodes, _ = load_tensors(directory / NODES, what="artifact nodes file")
    sizes = {key: tuple(v.shape) for key, v in nodes.items()}
    if any(len(shape) == 0 or shape[0] != manifest.num_nodes for shape in sizes.values()):
        raise ValueError(
            f"{directory}: the manifest says {manifest.num_nodes} nodes but {NODES} holds tensors "
            f"with leading sizes {sorted({s[0] if s else 0 for s in sizes.values()})}"
        )
    path_cls = PATH_KINDS[manifest.basis]
    if issubclass(path_cls, PolyChain):
        path = path_cls(nodes, knots=manifest.knots)
    else:
        path = path_cls(nodes)

    buffers: dict[float, StateDict] = {}
    if (directory / BUFFERS).exists():
        flat, meta = load_tensors(directory / BUFFERS, what="artifact buffers file")
        index = {int(i): float(t) for i, t in meta.get("ts", {}).items()}
        for key, value in flat.items():
            tag, _, name = key.partition("/")
            i = int(tag[1:])
            if i not in index:
                raise ValueError(f"{directory}: buffer {key!r} refers to an unknown t index {i}")
            buffers.setdefault(index[i], {})[name] = value
    artifact = PathArtifact(manifest=manifest, path=path, buffers=buffers)
    _check_against_model(directory, artifact)
    return artifact


def _check_against_model(directory: FsPath, artifact: PathArtifact) -> None:
    """The nodes must be exactly the parameters of the architecture the manifest names."""
    model = artifact.build_model()
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    found = {key: tuple(v.shape[1:]) for key, v in artifact.path.nodes.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise ValueError(
            f"{directory}: nodes do not match model {artifact.manifest.model.name!r} "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]})"
        )
    if has_batchnorm(model):
        absent = [t for t in artifact.manifest.served_ts if t not in artifact.buffers]
        if absent:
            raise ValueError(
                f"{directory}: BatchNorm model without stored statistics for served t {absent[:5]}"
            )
