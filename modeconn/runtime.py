"""Run exported models with onnxruntime: CUDA when there is a GPU, the CPU otherwise.

This module is what the batch evaluator and the HTTP service use, so it imports neither torch
nor anything that does (onnxruntime itself is imported inside the functions). A session asks
for ``CUDAExecutionProvider`` first and ``CPUExecutionProvider`` second; onnxruntime-gpu falls
back to the CPU without an exception when no GPU (or no CUDA library) is found, so the
provider actually used is read back from the session and logged (at the caller's level) per
session; that CUDA is unavailable is said once per process, at INFO.

Every model written by :mod:`modeconn.export` carries a JSON manifest in its ONNX metadata
(key ``"modeconn"``): path name, method, t values, input shape, classes, preprocessing and
output names. :class:`OnnxModel` parses it, so a consumer needs nothing but the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

__all__ = [
    "METADATA_KEY",
    "OnnxModel",
    "open_session",
    "session_options",
    "read_metadata",
]

log = logging.getLogger("modeconn")

#: The ONNX ``metadata_props`` key under which modeconn stores its JSON manifest.
METADATA_KEY = "modeconn"

Device = Literal["auto", "cuda", "cpu"]
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
#: onnxruntime's log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. onnxruntime-gpu
#: logs an *error* when it cannot load CUDA before falling back, so errors are hidden too;
#: genuine failures still raise exceptions.
_QUIET = 4
_cuda_failed = False  # set once a CUDA request fell back, so later sessions skip the attempt
_fallback_said = False  # set once the CPU fallback was logged: one line per process, not session

ModelSource = str | os.PathLike | bytes


def session_options(intra_op_threads: int | None = None, *, spinning: bool = True):
    """Session options: all graph optimisations, sequential execution, quiet logs.

    ``intra_op_threads`` (None or 0: onnxruntime's default, one per physical core) sets the
    threads one operator may use. ``spinning=False`` stops idle pool threads from busy-waiting
    for work: worth it when many sessions share few cores (their pools otherwise compete).
    """
    import onnxruntime as ort

    if intra_op_threads is not None and (
        isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int)
    ):
        raise TypeError(f"intra_op_threads must be an int or None, got {intra_op_threads!r}")
    if intra_op_threads is not None and intra_op_threads < 0:
        raise ValueError(f"intra_op_threads must be >= 0 (0: default), got {intra_op_threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads or 0
    options.log_severity_level = _QUIET
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(
    model: ModelSource,
    *,
    device: Device = "auto",
    intra_op_threads: int | None = None,
    name: str | None = None,
    log_level: int = logging.INFO,
    spinning: bool = True,
):
    """An ``onnxruntime.InferenceSession`` for ``model`` (a file path or serialized bytes).

    ``device="auto"``: CUDA first, CPU as fallback (no error; one log line at ``log_level``
    says which provider runs, and the fallback is said once per process at INFO). ``"cpu"``:
    CPU only. ``"cuda"``: CUDA or a ``RuntimeError``.
    """
    import onnxruntime as ort

    global _cuda_failed
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if not isinstance(model, bytes):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        model = str(path)
        name = name or path.name
    name = name or "model"
    ort.set_default_logger_severity(_QUIET)
    cuda_listed = _CUDA in ort.get_available_providers()
    want_cuda = device == "cuda" or (device == "auto" and cuda_listed and not _cuda_failed)
    providers = [_CUDA, _CPU] if want_cuda else [_CPU]
    try:
        session = ort.InferenceSession(
            model,
            sess_options=session_options(intra_op_threads, spinning=spinning),
            providers=providers,
        )
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ValueError(f"onnxruntime cannot load {name}: {err}") from err
    used = session.get_providers()
    if want_cuda and _CUDA not in used:
        _cuda_failed = True
        if device == "cuda":
            raise RuntimeError(
                f"CUDA was requested for {name} but onnxruntime could not use it (no GPU or "
                "no CUDA libraries); use device='auto' or 'cpu'"
            )
    log.log(log_level, "onnxruntime: %s runs on %s", name, used[0])
    if device == "auto" and _CUDA not in used:
        _say_fallback()
    return session


def _say_fallback() -> None:
    """Log once per process that sessions asked for CUDA first run on the CPU."""
    global _fallback_said
    if not _fallback_said:
        _fallback_said = True
        log.info("onnxruntime: CUDA unavailable, running on the CPU (said once per process)")


def read_metadata(model: ModelSource) -> dict[str, Any]:
    """The modeconn manifest stored in an ONNX file (``{}`` if it has none)."""
    import onnx

    if not isinstance(model, bytes) and not Path(model).is_file():
        raise FileNotFoundError(f"ONNX model not found: {model}")
    try:
        proto = (
            onnx.load_model_from_string(model)
            if isinstance(model, bytes)
            else onnx.load(str(model), load_external_data=False)
        )
    except FileNotFoundError:
        raise
    except Exception as err:  # protobuf's DecodeError and friends
        raise ValueError(
            f"cannot read {model if not isinstance(model, bytes) else 'model'}: {err}"
        ) from err
    props = {p.key: p.value for p in proto.metadata_props}
    return _parse_manifest(props.get(METADATA_KEY), "model")


def _describe(model: ModelSource) -> str:
    return f"{len(model)} bytes" if isinstance(model, bytes) else str(model)


def _parse_manifest(text: str | None, name: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{name}: its {METADATA_KEY!r} metadata is not valid JSON ({err})"
        ) from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{name}: its {METADATA_KEY!r} metadata is not a JSON object")
    return manifest


class OnnxModel:
    """An exported ensemble or merged model, ready to run: session plus parsed manifest.

    ``run(x)`` takes ``(N, *input_shape)`` inputs and returns every output by name:
    ``probabilities`` (N, C) and ``log_probabilities`` (N, C), plus ``uncertainty`` (N, 3)
    (entropy, mutual information, disagreement) for an ensemble.
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        device: Device = "auto",
        intra_op_threads: int | None = None,
        name: str | None = None,
        spinning: bool = True,
        log_level: int = logging.INFO,
    ):
        self.session = open_session(
            model,
            device=device,
            intra_op_threads=intra_op_threads,
            name=name,
            spinning=spinning,
            log_level=log_level,
        )
        self.name = name or (Path(model).name if not isinstance(model, bytes) else "model")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.manifest: dict[str, Any] = _parse_manifest(meta.get(METADATA_KEY), self.name)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.name} has {len(inputs)} inputs; expected exactly one")
        self.input_name: str = inputs[0].name
        declared = inputs[0].shape  # e.g. ['batch', 1, 8, 8]
        shape = self.manifest.get("input_shape") or declared[1:]
        if any(not isinstance(d, int) for d in shape):
            raise ValueError(f"{self.name}: input shape {declared} is not fixed beyond the batch")
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in shape)
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        """The execution provider that runs this model (``CUDAExecutionProvider`` or CPU)."""
        return self.session.get_providers()[0]

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", ""))

    @property
    def ts(self) -> list[float]:
        return [float(t) for t in self.manifest.get("ts", [])]

    @property
    def num_classes(self) -> int | None:
        return self.manifest.get("num_classes")

    @property
    def preprocessing(self) -> dict:
        return dict(self.manifest.get("preprocessing", {}))

    def __repr__(self) -> str:
        return (
            f"OnnxModel({self.name!r}, kind={self.kind!r}, input={list(self.input_shape)}, "
            f"outputs={self.output_names}, provider={self.provider!r})"
        )

    def run(self, x: np.ndarray, *, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Every output for inputs ``x`` of shape ``(N, *input_shape)`` (cast to float32).

        ``batch_size`` splits large inputs into chunks (results are concatenated).
        """
        x = np.asarray(x)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"inputs must be numeric, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"inputs have shape {list(x.shape)}; {self.name} expects "
                f"[N, {', '.join(str(d) for d in self.input_shape)}]"
            )
        if len(x) == 0:
            raise ValueError("inputs are empty: give at least one input")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        step = batch_size or len(x)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        for begin in range(0, len(x), step):
            # Dense tensors: the graphs served here have no sequence, map or sparse outputs.
            outputs = cast(
                list[np.ndarray], self.session.run(None, {self.input_name: x[begin : begin + step]})
            )
            for name, value in zip(self.output_names, outputs):
                parts[name].append(value)
        return {
            name: values[0] if len(values) == 1 else np.concatenate(values)
            for name, values in parts.items()
        }
