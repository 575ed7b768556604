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

The index records the SHA-256 of every graph, and a graph is opened or sent only through
:func:`read_graph` / :func:`verify_graph`: a regular file (not a symbolic link) directly inside
the serving directory whose bytes match that hash; anything else is an :class:`IntegrityError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from modeconn.cascade import Rule, StopRule
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
    "Precision",
    "ServedGraph",
    "ServedCascade",
    "ServingIndex",
    "IntegrityError",
    "ensemble_file",
    "merged_file",
    "int8_file",
    "match_t",
    "unique_ts",
    "absolute_data_spec",
    "resolve_data_spec",
    "read_manifest",
    "read_index",
    "file_sha256",
    "read_graph",
    "verify_graph",
]

MANIFEST_FILE = "manifest.json"
NODES_FILE = "nodes.safetensors"
BUFFERS_FILE = "buffers.safetensors"
SERVING_DIR = "serving"
INDEX_FILE = "index.json"
FORMAT_VERSION = 1
#: /3: every graph carries its sha256 (an index without them cannot be checked: rebuild it).
SERVING_FORMAT = "modeconn.serving/3"
#: Two t values closer than this are the same point of a path (requests, served t values).
T_TOLERANCE = 1e-6
#: A graph's file name: plain (no folder, not hidden), so it can only name a file of the bundle.
_GRAPH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.onnx")
_CHUNK = 1 << 20


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


def int8_file(fp32_file: str) -> str:
    """File name of the int8 copy of the graph ``fp32_file``."""
    return fp32_file.removesuffix(".onnx") + "_int8.onnx"


#: The precisions a serving bundle's graphs come in.
Precision = Literal["fp32", "int8"]


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
    """Everything a consumer needs to know about a path artifact, validated on load.

    ``data.name`` is the data spec with an absolute path (:func:`absolute_data_spec`); older
    manifests may hold a relative one, which :func:`resolve_data_spec` looks for.
    """

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
    bn_examples: int | None = Field(
        None,
        ge=1,
        description="training inputs BatchNorm statistics are recomputed from: a seeded subset "
        "of this many (modeconn.bn.bn_subset); None: the whole training set, as every artifact "
        "written before this field was",
    )
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
# Data specs with paths


def _split_spec(spec: str) -> tuple[str, str, str] | None:
    """``(kind, path, query)`` of a spec ``KIND:PATH[?QUERY]``; None for one without a path."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        return None
    path, mark, query = arg.partition("?")
    return kind, path, mark + query


def absolute_data_spec(spec: str, base: str | os.PathLike | None = None) -> str:
    """``spec`` with its path absolute: ``npz:data/x.npz`` -> ``npz:/home/me/data/x.npz``.

    A data spec is ``KIND`` or ``KIND:PATH`` (see :func:`modeconn.data.load_data`), the path
    relative to ``base`` (default: the working directory), ``~`` expanded; a query such as
    ``?size=28`` is kept. Artifacts and endpoint files store specs so, and then every command
    finds the data from any working directory.
    """
    parts = _split_spec(spec)
    if parts is None:
        return spec
    kind, path, query = parts
    full = os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(path)))
    return f"{kind}:{full}{query}"


def resolve_data_spec(spec: str, directory: str | os.PathLike) -> str:
    """The spec to load for the data recorded in the artifact (or file) in ``directory``.

    An absolute path is used as recorded. A relative one (manifests written before paths were
    stored absolute) meant the working directory of the fit: it is looked for from the
    working directory first, then from ``directory`` and each folder above it; not found,
    ``ValueError`` says so and how to give the data.
    """
    parts = _split_spec(spec)
    if parts is None or Path(os.path.expanduser(parts[1])).is_absolute():
        return spec
    kind, path, query = parts
    here = Path.cwd()
    folder = Path(os.path.abspath(directory))
    for base in (here, folder, *folder.parents):
        if (base / path).exists():
            return absolute_data_spec(spec, base)
    raise ValueError(
        f"{directory} records its data as {spec!r}, a path relative to the folder it was fitted "
        f"from, and {path} is found neither from {here} nor from the artifact's folders: run "
        f"the command from that folder, or give the data with --data "
        f"{kind}:/full/path/to/{Path(path).name}{query}"
    )


# ---------------------------------------------------------------------------------------------
# The serving index


class ServedGraph(_Strict):
    """One ONNX graph of a bundle."""

    mode: Literal["ensemble", "merged"]
    k: int = Field(ge=1, description="members in the graph (1 for a merged model)")
    ts: list[float] = Field(description="the members' t values (one for a merged model)")
    file: str = Field(description="plain file name inside the serving directory")
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the file, checked before it is opened or sent",
    )
    size_bytes: int = 0
    max_abs_diff: float | None = Field(None, description="|onnxruntime - torch| at export")
    bn: list[str] = Field(default_factory=list, description="BatchNorm statistics per member")
    precision: Precision = Field(
        default="fp32",
        description="int8: a statically quantized copy of the fp32 graph of this mode",
    )
    int8_check: dict | None = Field(
        default=None,
        description="int8: agreement and accuracy against fp32 on the test split, at build",
    )

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _GRAPH_NAME.fullmatch(value):
            raise ValueError(
                "must be a plain .onnx file name inside the serving directory (like "
                f"'ensemble_k4.onnx'), got {value!r}"
            )
        return value


class ServedCascade(_Strict):
    """A confidence cascade of a bundle: single-model graphs at its members' t values, run one
    at a time until each input's stop rule holds (:mod:`modeconn.cascade`). Its members are
    merged-model graphs of the same bundle; nothing is stored twice."""

    k: int = Field(ge=1, description="members, at most (every input that never stops runs all)")
    ts: list[float] = Field(description="the members' t values, in the order they run")
    rule: Rule = Field(
        "confidence", description="when an input leaves: see modeconn.cascade.StopRule"
    )
    threshold: float = Field(
        0.95, description="confidence: the running mean's top probability; agree: how many"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServedCascade:
        if len(self.ts) != self.k:
            raise ValueError(f"a cascade of k={self.k} members needs {self.k} t values")
        StopRule(self.rule, self.threshold)  # raises on a threshold the rule cannot take
        return self


class ServingIndex(_Strict):
    """``serving/index.json``: what a bundle adds to its artifact."""

    format: Literal["modeconn.serving/3"] = SERVING_FORMAT
    artifact_created: str = Field("", description="the manifest's creation stamp (staleness)")
    has_batchnorm: bool = False
    created: str = ""
    requested: dict = Field(default_factory=dict, description="{ks, ts} asked for")
    graphs: list[ServedGraph] = Field(default_factory=list)
    skipped: list[dict] = Field(default_factory=list, description="graphs not built, and why")
    cascade: ServedCascade | None = Field(None, description="the cascade built, if any")

    @property
    def ensembles(self) -> dict[int, ServedGraph]:
        """Ensemble graphs (fp32) by K."""
        return {g.k: g for g in self.graphs if g.mode == "ensemble" and g.precision == "fp32"}

    @property
    def merged(self) -> dict[float, ServedGraph]:
        """Merged-model graphs (fp32) by t."""
        return {g.ts[0]: g for g in self.graphs if g.mode == "merged" and g.precision == "fp32"}

    @property
    def int8(self) -> list[ServedGraph]:
        """The int8 copies."""
        return [g for g in self.graphs if g.precision == "int8"]

    def find(self, mode: str, ts: Iterable[float]) -> ServedGraph | None:
        """The fp32 graph of ``mode`` whose members sit at ``ts`` (in order, within
        :data:`T_TOLERANCE`), if the bundle holds one."""
        wanted = list(ts)
        for graph in self.graphs:
            same = graph.mode == mode and graph.precision == "fp32" and len(graph.ts) == len(wanted)
            if same and all(abs(t - g) <= T_TOLERANCE for t, g in zip(wanted, graph.ts)):
                return graph
        return None


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


# ---------------------------------------------------------------------------------------------
# The graphs of a bundle, checked against the index


class IntegrityError(ValueError):
    """A bundle's graph that is not what its index records: changed bytes, a missing file, a
    symbolic link, anything but a regular file inside the serving directory.

    ``reason`` says what is wrong without naming any file system path (for HTTP answers)."""

    def __init__(self, message: str, reason: str = "is not what its serving index records"):
        super().__init__(message)
        self.reason = reason


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open_graph(directory: Path, graph: ServedGraph) -> tuple[int, Path]:
    """A read-only descriptor of ``graph``'s file, refused unless it is a regular file directly
    inside ``directory/serving`` (neither the folder nor the file a symbolic link)."""
    serving = directory / SERVING_DIR
    file = serving / graph.file
    rebuild = f"rebuild the bundle with `modeconn serve-build {directory} --force`"
    try:
        if not stat.S_ISDIR(os.lstat(serving).st_mode):
            raise IntegrityError(
                f"{serving} is not a directory (symbolic links are refused)",
                "is not in a plain serving directory",
            )
        mode = os.lstat(file).st_mode
    except FileNotFoundError:
        raise IntegrityError(
            f"{file} is listed in the serving index but missing; {rebuild}", "is missing"
        ) from None
    except OSError as err:
        raise IntegrityError(f"cannot read {file}: {err}", "cannot be read") from err
    if stat.S_ISLNK(mode):
        raise IntegrityError(
            f"{file} is a symbolic link; a bundle serves only regular files of its own "
            f"serving directory ({rebuild})",
            "is a symbolic link (only regular files of the bundle are served)",
        )
    if not stat.S_ISREG(mode):
        raise IntegrityError(f"{file} is not a regular file; {rebuild}", "is not a regular file")
    # O_NOFOLLOW: the file cannot become a link between the check and the open; O_NONBLOCK:
    # a FIFO put in its place cannot block the open (it then fails the regular-file check).
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(file, flags | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise IntegrityError(
            f"cannot open {file} as a regular file ({err}); {rebuild}", "cannot be opened"
        ) from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IntegrityError(f"{file} is not a regular file; {rebuild}", "is not a regular file")
    return fd, file


def _mismatch(directory: Path, file: Path, graph: ServedGraph, found: str) -> IntegrityError:
    return IntegrityError(
        f"{file} does not match its serving index (sha256 {found[:16]}..., the index records "
        f"{graph.sha256[:16]}...): it changed after it was built; rebuild the bundle with "
        f"`modeconn serve-build {directory} --force`",
        "does not match the sha256 its serving index records (it changed after it was built)",
    )


def read_graph(directory: str | os.PathLike, graph: ServedGraph) -> bytes:
    """The bytes of ``graph``'s file in the artifact ``directory``, checked against the index
    (:class:`IntegrityError` if they differ, or if the file is not a regular file of the
    bundle). Open these bytes, not the file: then what runs is what was checked."""
    directory = Path(directory)
    fd, file = _open_graph(directory, graph)
    try:
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise IntegrityError(f"cannot read {file}: {err}", "cannot be read") from err
    found = hashlib.sha256(data).hexdigest()
    if found != graph.sha256:
        raise _mismatch(directory, file, graph, found)
    return data


def verify_graph(directory: str | os.PathLike, graph: ServedGraph) -> os.stat_result:
    """Check ``graph``'s file in the artifact ``directory`` against the index, as
    :func:`read_graph` does, without holding it in memory; returns the status of the file
    that was checked (its identity, size and times tell whether it changed since)."""
    directory = Path(directory)
    fd, file = _open_graph(directory, graph)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise IntegrityError(f"cannot read {file}: {err}", "cannot be read") from err
    if digest.hexdigest() != graph.sha256:
        raise _mismatch(directory, file, graph, digest.hexdigest())
    return info
