"""What is written to disk about a path artifact and its serving bundle: file names, the typed
manifest and serving index, and how t values are matched. Torch-free (pydantic only), so that
the service reads the same typed records the library writes.

Layout of an artifact directory::

    <artifact>/manifest.json               Manifest: what the artifact is (written once)
    <artifact>/nodes.safetensors           the stacked nodes of the path
    <artifact>/buffers.safetensors         BatchNorm statistics per served t (BN models only)
    <artifact>/serving/index.json          ServingIndex: what the bundle adds (its graphs)
    <artifact>/serving/ensemble_k4.onnx    one graph per K-member ensemble
    <artifact>/serving/merged_t0.5000.onnx one graph per merged model at a served t

Each fact is stored once: the index holds only what building the bundle decided (graphs,
skipped graphs, the request) and the creation stamp of the manifest it was built from; the
artifact's own description (method, model, data, preprocessing) is read from the manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modeconn.validation import problems

if TYPE_CHECKING:
    from modeconn.checkpoint import ModelSpec

__all__ = [
    "MANIFEST_FILE",
    "NODES_FILE",
    "BUFFERS_FILE",
    "SERVING_DIR",
    "INDEX_FILE",
    "FORMAT_VERSION",
    "SERVING_FORMAT",
    "T_TOLERANCE",
    "ModelInfo",
    "DataInfo",
    "Manifest",
    "ServedGraph",
    "ServingIndex",
    "ensemble_file",
    "merged_file",
    "match_t",
    "unique_ts",
    "read_manifest",
    "read_index",
]

MANIFEST_FILE = "manifest.json"
NODES_FILE = "nodes.safetensors"
BUFFERS_FILE = "buffers.safetensors"
SERVING_DIR = "serving"
INDEX_FILE = "index.json"
FORMAT_VERSION = 1
SERVING_FORMAT = "modeconn.serving/2"
#: Two t values closer than this are the same point of a path (requests, served t values).
T_TOLERANCE = 1e-6


def match_t(t: float, candidates: Iterable[float]) -> float | None:
    """The candidate within :data:`T_TOLERANCE` of ``t``, if any (the nearest one)."""
    near = [c for c in candidates if abs(c - t) <= T_TOLERANCE]
    return min(near, key=lambda c: abs(c - t)) if near else None


def unique_ts(ts: Iterable[float]) -> list[float]:
    """``ts`` sorted, without values that :func:`match_t` would take for one another."""
    out: list[float] = []
    for t in ts:
        if match_t(t, out) is None:
            out.append(t)
    return sorted(out)


def ensemble_file(k: int) -> str:
    """File name of the K-member ensemble graph."""
    return f"ensemble_k{k}.onnx"


def merged_file(t: float) -> str:
    """File name of the merged-model graph at ``t``."""
    return f"merged_t{t:.4f}.onnx"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# The manifest


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

    @property
    def name(self) -> str:
        """The artifact's own name (its directory name at fit time)."""
        return str(self.fit.get("name") or self.method)

    @property
    def preprocessing(self) -> dict:
        """How raw inputs become model inputs (from the data it was fitted on)."""
        return dict(self.data.preprocessing) if self.data else {}

    def served_t(self, t: float) -> float | None:
        """The served t value that ``t`` names, if any."""
        return match_t(t, self.served_ts)

    def model_spec(self) -> ModelSpec:
        from modeconn.checkpoint import ModelSpec

        return ModelSpec.from_json(self.model.model_dump())


# ---------------------------------------------------------------------------------------------
# The serving index


class ServedGraph(_Strict):
    """One ONNX graph of a bundle."""

    mode: Literal["ensemble", "merged"]
    k: int = Field(ge=1, description="members in the graph (1 for a merged model)")
    ts: list[float] = Field(description="the members' t values (one for a merged model)")
    file: str = Field(description="file name inside the serving directory")
    size_bytes: int = 0
    max_abs_diff: float | None = Field(None, description="|onnxruntime - torch| at export")
    bn: list[str] = Field(default_factory=list, description="BatchNorm statistics per member")


class ServingIndex(_Strict):
    """``serving/index.json``: what a bundle adds to its artifact."""

    format: Literal["modeconn.serving/2"] = SERVING_FORMAT
    artifact_created: str = Field("", description="the manifest's creation stamp (staleness)")
    has_batchnorm: bool = False
    created: str = ""
    requested: dict = Field(default_factory=dict, description="{ks, ts} asked for")
    graphs: list[ServedGraph] = Field(default_factory=list)
    skipped: list[dict] = Field(default_factory=list, description="graphs not built, and why")

    @property
    def ensembles(self) -> dict[int, ServedGraph]:
        """Ensemble graphs by K."""
        return {g.k: g for g in self.graphs if g.mode == "ensemble"}

    @property
    def merged(self) -> dict[float, ServedGraph]:
        """Merged-model graphs by t."""
        return {g.ts[0]: g for g in self.graphs if g.mode == "merged"}


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The validated manifest of the artifact in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"artifact directory not found: {directory}")
    file = directory / MANIFEST_FILE
    if not file.is_file():
        raise ValueError(f"{directory} is not a modeconn artifact: it has no {MANIFEST_FILE}")
    try:
        return Manifest.model_validate_json(file.read_text())
    except ValidationError as err:
        raise ValueError(f"{file} is not a valid manifest: {problems(err)}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {file}: {err}") from err


def read_index(directory: str | os.PathLike) -> ServingIndex:
    """The serving index of the artifact in ``directory`` (``FileNotFoundError`` if none)."""
    file = Path(directory) / SERVING_DIR / INDEX_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{directory} has no serving bundle ({SERVING_DIR}/{INDEX_FILE}); build one with "
            f"`modeconn serve-build {directory}`"
        )
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {file}: {err}") from err
    found = raw.get("format") if isinstance(raw, dict) else None
    if found != SERVING_FORMAT and isinstance(found, str) and found.startswith("modeconn.serving/"):
        raise ValueError(
            f"{file} was written by another version of modeconn ({found}, this one reads "
            f"{SERVING_FORMAT}); rebuild it with `modeconn serve-build {directory} --force`"
        )
    try:
        return ServingIndex.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"{file} is not a valid serving index: {problems(err)}") from err
