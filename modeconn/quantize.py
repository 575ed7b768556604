"""Int8 ONNX graphs of exported ensembles and merged models, checked against fp32 on data.

An fp32 graph written by :mod:`modeconn.export` is statically quantized with onnxruntime's
quantization tools (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference"): weights int8 per output channel, activations
uint8 with ranges calibrated (min/max) on a seeded sample of training inputs, in QOperator
format (``QLinearConv``, ``QGemm``, ``QLinearAdd``). Measured on a 2-core AVX-512 VNNI CPU,
one thread, K=8 fused ensembles at batch 256 (``benchmarks/bench_int8.py``): QOperator 1.8-2.3x
the fp32 images/s, QDQ 1.8-2.2x, within noise of each other once residual ``Add`` is quantized
too (without it QOperator fell to 1.5x on ResNet-20); ``format="qdq"`` is kept as an option.
Dynamic quantization was measured too and is no option here: onnxruntime quantizes ``MatMul``
dynamically but not the ``Gemm`` nodes that every ``nn.Linear`` exports to, so an MLP came back
unchanged.

Only the members' own layers are quantized: ``Conv``/``Gemm``/``MatMul`` with constant weights,
and the ``Add`` (residual sums) and ``Relu`` between them, so int8 flows from layer to layer.
Everything downstream of the first (Log)Softmax (the ensemble's mean, entropy, mutual information
and disagreement) stays fp32: there int8 rounding would move probabilities, not logits.
Inputs, outputs and their names are unchanged, so :class:`modeconn.runtime.OnnxModel` runs the
int8 file exactly like the fp32 one.

Before anything is written both graphs run on held-out data: top-1 agreement, accuracy of each
and the max abs difference of probabilities are measured and stored in the manifest
(``"precision": "int8"``, ``"quantization"``); an accuracy drop over ``tolerance`` points raises
:class:`QuantizationRefused` unless ``force``. The file is written atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from modeconn.io import atomic_file
from modeconn.runtime import METADATA_KEY, OnnxModel

__all__ = [
    "DEFAULT_TOLERANCE",
    "Int8Check",
    "QuantizationRefused",
    "QuantizeResult",
    "calibration_sample",
    "check_int8",
    "quantize_onnx",
]

log = logging.getLogger("modeconn")

QuantFormatName = Literal["qoperator", "qdq"]

#: Default largest accepted accuracy drop, in percentage points, int8 vs fp32 on the test split.
DEFAULT_TOLERANCE = 0.5
#: The layers quantized: the members' own weighted products.
_WEIGHTED = ("Conv", "Gemm", "MatMul")
#: Element-wise ops of the members quantized too (residual sums), so int8 flows between layers.
_ELEMENTWISE = ("Add", "Relu")
#: Everything after these is the probability head, kept in fp32.
_HEAD_START = ("Softmax", "LogSoftmax")
_CHECK_BATCH = 256


class QuantizationRefused(ValueError):
    """The int8 graph lost more accuracy than the tolerance allows; nothing was written."""


@dataclass(frozen=True)
class Int8Check:
    """An int8 graph against its fp32 original on labelled inputs."""

    examples: int
    agreement: float  # share of inputs whose top-1 class is the same in both
    accuracy_fp32: float
    accuracy_int8: float
    accuracy_drop_points: float  # 100 * (fp32 - int8); negative: int8 is more accurate
    max_abs_prob_diff: float

    def describe(self) -> str:
        return (
            f"int8 vs fp32 on {self.examples} test inputs: top-1 agreement "
            f"{100 * self.agreement:.2f} %, accuracy {100 * self.accuracy_int8:.2f} % vs "
            f"{100 * self.accuracy_fp32:.2f} % ({-self.accuracy_drop_points:+.2f} points), "
            f"max |p_int8 - p_fp32| = {self.max_abs_prob_diff:.3g}"
        )


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_onnx` wrote."""

    path: Path
    format: str  # "qoperator" or "qdq"
    check: Int8Check
    size_bytes: int
    fp32_size_bytes: int
    quantized_nodes: int
    seconds: float = 0.0
    manifest: dict = field(default_factory=dict)


def calibration_sample(x_train: np.ndarray, n: int = 256, seed: int = 0) -> np.ndarray:
    """``n`` training inputs drawn without replacement by a seeded generator: ``(n, ...)``."""
    x_train = np.asarray(x_train, dtype=np.float32)
    if n < 1:
        raise ValueError(f"the calibration sample needs n >= 1 inputs, got {n}")
    rng = np.random.default_rng(seed)
    index = rng.choice(len(x_train), size=min(n, len(x_train)), replace=False)
    return x_train[np.sort(index)]  # (n, *input_shape)


def check_int8(
    fp32: OnnxModel, int8: OnnxModel, x: np.ndarray, y: np.ndarray, batch_size: int = _CHECK_BATCH
) -> Int8Check:
    """Top-1 agreement, accuracies and max abs probability difference of ``int8`` vs ``fp32``."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).reshape(-1)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"need as many labels as inputs (> 0), got {len(x)} inputs, {len(y)} labels"
        )
    p32 = fp32.run(x, batch_size=batch_size)["probabilities"]  # (N, C)
    p8 = int8.run(x, batch_size=batch_size)["probabilities"]  # (N, C)
    top32, top8 = p32.argmax(-1), p8.argmax(-1)  # (N,)
    acc32, acc8 = float((top32 == y).mean()), float((top8 == y).mean())
    return Int8Check(
        examples=len(x),
        agreement=float((top32 == top8).mean()),
        accuracy_fp32=acc32,
        accuracy_int8=acc8,
        accuracy_drop_points=100.0 * (acc32 - acc8),
        max_abs_prob_diff=float(np.abs(p8.astype(np.float64) - p32).max()),
    )


def _quantizable_nodes(graph) -> list[str]:
    """Names of the members' nodes to quantize: weighted ones (constant second input) and the
    element-wise ones between them, all upstream of every (Log)Softmax."""
    constants = {init.name for init in graph.initializer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    head: set[str] = set()  # tensors computed from a (log-)softmax
    downstream: set[str] = set()
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type in _HEAD_START or any(i in head for i in node.input):
            head.update(node.output)
            downstream.add(node.name)
    return [
        n.name
        for n in graph.node
        if n.name not in downstream
        and (
            (n.op_type in _WEIGHTED and len(n.input) > 1 and n.input[1] in constants)
            or n.op_type in _ELEMENTWISE
        )
    ]


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizer logs advice on the root logger and warns; neither is for users."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


class _Reader:
    """Feeds the calibration sample to onnxruntime in batches (a CalibrationDataReader)."""

    def __init__(self, name: str, x: np.ndarray, batch: int):
        self._batches = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self) -> None:  # not needed by min/max calibration
        pass


def _quantize_file(
    src: Path,
    dst: Path,
    nodes: list[str],
    fmt: QuantFormatName,
    calibration: np.ndarray,
    input_name: str,
) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    quantize_static(
        src,
        dst,
        _Reader(input_name, calibration, 32),  # type: ignore[arg-type]
        quant_format=QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ,
        op_types_to_quantize=[*_WEIGHTED, *_ELEMENTWISE],
        nodes_to_quantize=nodes,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def quantize_onnx(
    fp32: str | os.PathLike,
    out: str | os.PathLike,
    *,
    x_test: np.ndarray,
    y_test: np.ndarray,
    calibration: np.ndarray,
    format: QuantFormatName = "qoperator",
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
) -> QuantizeResult:
    """Write an int8 copy of the fp32 modeconn graph ``fp32`` to ``out``, checked on data.

    Activation ranges come from ``calibration`` inputs (e.g. :func:`calibration_sample` of the
    training data). Both graphs run on ``x_test``/``y_test``; if int8 loses more than
    ``tolerance`` accuracy points (a negative tolerance demands a gain),
    :class:`QuantizationRefused` is raised and nothing is written, unless ``force``. The manifest gains ``"precision": "int8"`` and the check.
    """
    import onnx

    begin = time.perf_counter()
    if format not in ("qoperator", "qdq"):
        raise ValueError(f"format must be 'qoperator' or 'qdq', got {format!r}")
    if not np.isfinite(tolerance):
        raise ValueError(f"the int8 tolerance must be a finite number of points, got {tolerance!r}")
    out = Path(out)
    if out.is_dir() or out.suffix != ".onnx":
        raise ValueError(f"--out {out}: an int8 graph is an onnx file; name it {out.stem}.onnx")
    src = Path(fp32)
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    manifest = json.loads(props.get(METADATA_KEY, "{}"))
    if manifest.get("precision", "fp32") != "fp32":
        raise ValueError(f"{src} is already {manifest['precision']}; quantize its fp32 original")
    nodes = _quantizable_nodes(proto.graph)
    if not any(n.op_type in _WEIGHTED for n in proto.graph.node if n.name in set(nodes)):
        raise ValueError(f"{src} has no Conv/Gemm/MatMul layer with constant weights to quantize")
    calib = np.asarray(calibration, dtype=np.float32)
    if calib.ndim < 2 or len(calib) == 0:
        raise ValueError(f"calibration inputs must be a non-empty batch, got shape {calib.shape}")
    input_name = proto.graph.input[0].name

    with tempfile.TemporaryDirectory(prefix="modeconn-int8-") as tmp:
        # The exporter's recorded intermediate shapes carry the traced batch size, which
        # onnx's strict shape inference (run by the quantizer) rejects: let it infer them anew.
        stripped = onnx.ModelProto()
        stripped.CopyFrom(proto)
        del stripped.graph.value_info[:]
        plain = Path(tmp) / "fp32.onnx"
        onnx.save(stripped, str(plain))
        dst = Path(tmp) / "int8.onnx"
        with _quiet_quantizer():
            _quantize_file(plain, dst, nodes, format, calib, input_name)
        quantized = onnx.load(str(dst))
    # The fp32 session and a provisional int8 one, both on the CPU: the check is about numbers.
    int8_bytes = quantized.SerializeToString()
    fp32_model = OnnxModel(src, device="cpu", log_level=logging.DEBUG)
    int8_model = OnnxModel(int8_bytes, device="cpu", name="int8 graph", log_level=logging.DEBUG)
    if (int8_model.input_name, int8_model.output_names) != (
        fp32_model.input_name,
        fp32_model.output_names,
    ):
        raise RuntimeError(
            f"the int8 graph's input {int8_model.input_name!r} and outputs "
            f"{int8_model.output_names} differ from the fp32 graph's {fp32_model.input_name!r} "
            f"and {fp32_model.output_names}"
        )
    if "probabilities" not in fp32_model.output_names:
        raise ValueError(
            f"{src} has outputs {fp32_model.output_names}, no 'probabilities': not a graph "
            "written by modeconn export"
        )
    check = check_int8(fp32_model, int8_model, x_test, y_test)
    log.info("%s", check.describe())
    if check.accuracy_drop_points > tolerance and not force:
        raise QuantizationRefused(
            f"int8 loses {check.accuracy_drop_points:.2f} accuracy points on the test split "
            f"(fp32 {100 * check.accuracy_fp32:.2f} %, int8 {100 * check.accuracy_int8:.2f} %), "
            f"over the tolerance of {tolerance:g}; nothing was written (raise --int8-tolerance "
            "or pass --force)"
        )
    manifest = {
        **manifest,
        "precision": "int8",
        "quantization": {
            "mode": "static",
            "format": format,
            "weights": "int8, per output channel",
            "activations": "uint8, min/max calibrated on training inputs",
            "calibration_examples": len(calib),
            "quantized_nodes": len(nodes),
            "fp32_head": "everything after the (log-)softmax",
            "tolerance_points": tolerance,
            "forced": bool(force and check.accuracy_drop_points > tolerance),
            "check": asdict(check),
        },
    }
    del quantized.metadata_props[:]
    for key, value in props.items():
        entry = quantized.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(manifest, sort_keys=True) if key == METADATA_KEY else value
    if METADATA_KEY not in props:
        entry = quantized.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(manifest, sort_keys=True)
    quantized.doc_string = proto.doc_string + " (int8)"
    data = quantized.SerializeToString()
    with atomic_file(out) as tmp_file:
        tmp_file.write_bytes(data)
    log.info("wrote %s (%.2f MB, int8 %s)", out, len(data) / 1e6, format)
    return QuantizeResult(
        path=out,
        format=format,
        check=check,
        size_bytes=len(data),
        fp32_size_bytes=src.stat().st_size,
        quantized_nodes=len(nodes),
        seconds=time.perf_counter() - begin,
        manifest=manifest,
    )
