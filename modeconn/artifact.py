"""Path artifacts: a directory that holds one fitted path (or FGE point set) and describes it.

``manifest.json`` (validated by :class:`Manifest`), ``nodes.safetensors`` (the stacked nodes,
parameters only, keyed like ``model.state_dict()`` with a leading node axis) and, for BatchNorm
models, ``buffers.safetensors`` (running statistics recomputed at each served t, keyed
``t{index}/{buffer name}``). Written to a temporary directory and renamed, so a crash never
leaves half an artifact; nothing is unpickled when reading.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path as FsPath

import torch
from torch import nn

from modeconn.bn import bn_subset, has_batchnorm, recompute_bn
from modeconn.formats import (
    BUFFERS_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    NODES_FILE,
    Manifest,
    read_manifest,
    resolve_data_spec,
)
from modeconn.io import atomic_dir, load_tensors, save_tensors
from modeconn.paths import PATH_KINDS, Path, PolyChain, as_state
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


@dataclass
class PathArtifact:
    """A loaded (or about to be saved) artifact: manifest, path and BN buffers per served t.

    ``directory`` is where it was read from or saved to (None for one only in memory).
    """

    manifest: Manifest
    path: Path
    buffers: dict[float, StateDict] = field(default_factory=dict)
    directory: FsPath | None = None

    @property
    def name(self) -> str:
        return self.manifest.fit.get("name", "")

    def data_spec(self, default: str = "digits") -> str:
        """The data set it was fitted on, as a spec :func:`modeconn.data.load_data` reads from
        any working directory (see :func:`modeconn.formats.resolve_data_spec`)."""
        data = self.manifest.data
        if data is None:
            return default
        return resolve_data_spec(data.name, self.directory or ".")

    def bn_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The training inputs this artifact recomputes BatchNorm statistics from: the subset
        its manifest records (``bn_examples``; all of them for older artifacts)."""
        return bn_subset(inputs, self.manifest.bn_examples)

    def build_model(self) -> nn.Module:
        return self.manifest.model_spec().build()

    def served_t(self, t: float) -> float | None:
        """The served t value that ``t`` names, if any."""
        return self.manifest.served_t(t)

    def state_at(self, t: float, model: nn.Module | None = None) -> StateDict:
        """A full state dict at ``t``: parameters on the path plus its stored BN statistics.

        For a BatchNorm model ``t`` must be one of the served t values (their statistics were
        recomputed on training data when the artifact was written); see
        :func:`modeconn.merge.merge_at` to recompute them at any other t.
        """
        model = model or self.build_model()
        params = as_state(self.path.at(t))
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
        t: {
            k: v.cpu()
            for k, v in recompute_bn(model, as_state(path.at(t)), inputs, device=device).items()
        }
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
        save_tensors(tmp / NODES_FILE, artifact.path.nodes, {"format": "modeconn.nodes/1"})
        if artifact.buffers:
            index = {f"{i}": t for i, t in enumerate(artifact.buffers)}
            flat = {
                f"t{i}/{key}": value
                for i, t in enumerate(artifact.buffers)
                for key, value in artifact.buffers[t].items()
            }
            save_tensors(tmp / BUFFERS_FILE, flat, {"format": "modeconn.buffers/1", "ts": index})
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    artifact.directory = directory
    return directory


def load_artifact(directory: str | os.PathLike) -> PathArtifact:
    """Read and check an artifact written by :func:`save_artifact`."""
    directory = FsPath(directory)
    manifest = read_manifest(directory)
    nodes, _ = load_tensors(directory / NODES_FILE, what="artifact nodes file")
    sizes = {key: tuple(v.shape) for key, v in nodes.items()}
    if any(len(shape) == 0 or shape[0] != manifest.num_nodes for shape in sizes.values()):
        raise ValueError(
            f"{directory}: the manifest says {manifest.num_nodes} nodes but {NODES_FILE} holds tensors "
            f"with leading sizes {sorted({s[0] if s else 0 for s in sizes.values()})}"
        )
    path_cls = PATH_KINDS[manifest.basis]
    if issubclass(path_cls, PolyChain):
        path = path_cls(nodes, knots=manifest.knots)
    else:
        path = path_cls(nodes)

    buffers: dict[float, StateDict] = {}
    if (directory / BUFFERS_FILE).exists():
        flat, meta = load_tensors(directory / BUFFERS_FILE, what="artifact buffers file")
        index = {int(i): float(t) for i, t in meta.get("ts", {}).items()}
        for key, value in flat.items():
            tag, _, name = key.partition("/")
            i = int(tag[1:])
            if i not in index:
                raise ValueError(f"{directory}: buffer {key!r} refers to an unknown t index {i}")
            buffers.setdefault(index[i], {})[name] = value
    artifact = PathArtifact(manifest=manifest, path=path, buffers=buffers, directory=directory)
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
