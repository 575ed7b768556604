"""``modeconn export DIR``: a path's ensemble or merged model as one ONNX file (or safetensors).

    modeconn export DIR --ensemble 5 --out model.onnx            # K members evenly in t
    modeconn export DIR --ts 0 0.3 0.7 1 --out model.onnx         # members at given t values
    modeconn export DIR --ensemble 5 --spacing arclength --data digits --out model.onnx
    modeconn export DIR --t 0.5 --out merged.onnx                 # the merged midpoint
    modeconn export DIR --t 0.5 --format safetensors --out merged.safetensors
    modeconn export DIR --ensemble 8 --int8 --out model_int8.onnx  # int8, checked against fp32

BatchNorm statistics come from the artifact for its served t values; other t values need
``--data`` (the training inputs) to recompute them, from the seeded subset the artifact records
(``--bn-examples`` for another).

``--int8`` writes an int8 graph with the same inputs, outputs and metadata (plus
``"precision": "int8"`` and the check), quantized statically with activation ranges calibrated on
a seeded sample of the training data (``--data``, else the data set the artifact records). Before
it is written it runs next to the fp32 graph on the test split; an accuracy drop of more than
``--int8-tolerance`` points (default 0.5) is refused (exit 2, nothing written) unless ``--force``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from modeconn.commands._common import (
    add_bn_examples,
    add_device,
    bn_examples_for,
    check_data_fits,
    resolve_device,
)

#: Defaults of the int8 flags (modeconn.quantize is not imported for --help: it imports numpy).
_DEFAULT_TOLERANCE = 0.5
_CALIBRATION = 256


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a path's ensemble or merged model to ONNX",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="artifact directory (from `modeconn connect`)")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--ensemble", type=int, metavar="K", help="export a K-member ensemble along the path"
    )
    what.add_argument(
        "--t", type=float, default=None, help="export the merged model at t (default: 0.5)"
    )
    p.add_argument(
        "--ts",
        type=float,
        nargs="+",
        metavar="T",
        help="the ensemble members' t values (instead of K evenly spaced ones)",
    )
    p.add_argument(
        "--spacing",
        choices=("t", "arclength"),
        default="t",
        help="members evenly spaced in t (endpoints included) or by arc length (default: t)",
    )
    p.add_argument("--out", required=True, help="file to write (.onnx, or .safetensors)")
    p.add_argument(
        "--format",
        choices=("onnx", "safetensors"),
        default="onnx",
        help="onnx, or safetensors for the merged weights as an endpoint file (default: onnx)",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="SPEC",
        help="training data to recompute BatchNorm statistics at t values the artifact "
        "does not store; also used as the probe batch",
    )
    p.add_argument(
        "--recompute-bn",
        action="store_true",
        help="recompute BatchNorm statistics at every t (needs --data)",
    )
    add_bn_examples(p, recorded=True)
    p.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="largest accepted |onnxruntime - torch| on the probe batch (default: 1e-4)",
    )
    int8 = p.add_argument_group("int8")
    int8.add_argument(
        "--int8",
        action="store_true",
        help="write an int8 graph (static quantization, checked against fp32 on the test split)",
    )
    int8.add_argument(
        "--int8-tolerance",
        type=float,
        default=None,
        metavar="POINTS",
        help=f"largest accepted test accuracy drop of int8 vs fp32, in points (default: "
        f"{_DEFAULT_TOLERANCE})",
    )
    int8.add_argument(
        "--int8-format",
        choices=("qoperator", "qdq"),
        default=None,
        help="onnxruntime's quantized graph format (default: qoperator, faster on CPU here)",
    )
    int8.add_argument(
        "--int8-calibration",
        type=int,
        default=None,
        metavar="N",
        help=f"seeded training inputs that calibrate activation ranges (default: {_CALIBRATION})",
    )
    int8.add_argument(
        "--force",
        action="store_true",
        help="write the int8 graph even when its accuracy drop exceeds --int8-tolerance",
    )
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modeconn.artifact import load_artifact
    from modeconn.checkpoint import Checkpoint
    from modeconn.data import load_data

    ensemble = args.ensemble is not None or args.ts is not None
    if ensemble and args.format == "safetensors":
        raise ValueError(
            "--format safetensors writes one merged model; an ensemble is exported as ONNX "
            "(drop --format, or use --t T)"
        )
    if args.ts is not None and args.t is not None:
        raise ValueError("--ts gives ensemble members; --t a merged model: use one of them")
    if args.ensemble is not None and args.ensemble < 1:
        raise ValueError(f"--ensemble K needs K >= 1, got {args.ensemble}")
    if args.recompute_bn and not args.data:
        raise ValueError("--recompute-bn needs --data (the training inputs)")
    if args.bn_examples is not None and not args.data:
        raise ValueError("--bn-examples needs --data (the training inputs to recompute from)")
    if not args.atol >= 0:
        raise ValueError(f"--atol must be >= 0, got {args.atol}")
    _check_int8_flags(args)
    device = resolve_device(args.device)
    artifact = load_artifact(args.dir)  # a corrupt artifact fails here, before any file exists
    if args.bn_examples is not None:  # instead of the artifact's own
        m = artifact.manifest
        artifact.manifest = m.model_copy(
            update={"bn_examples": bn_examples_for(args, m.bn_examples)}
        )
    inputs = probe = data = None
    if args.data:
        data = load_data(args.data)
        check_data_fits(
            data,
            Checkpoint(state={}, model=artifact.manifest.model_spec(), meta={"file": args.dir}),
        )
        inputs, probe = data.x_train, data.x_test[:64]
    bn = "recompute" if args.recompute_bn else "auto"
    if not args.int8:
        _export(args, artifact, args.out, ensemble, inputs, bn, probe, device)
        return 0
    with tempfile.TemporaryDirectory(prefix="modeconn-export-") as tmp:
        # The fp32 graph is an intermediate here: written aside, then quantized into --out.
        result = _export(
            args, artifact, Path(tmp) / "fp32.onnx", ensemble, inputs, bn, probe, device
        )
        _quantize(args, artifact, result, data)
    return 0


def _check_int8_flags(args: argparse.Namespace) -> None:
    given = [
        flag
        for flag, value in (
            ("--int8-tolerance", args.int8_tolerance),
            ("--int8-format", args.int8_format),
            ("--int8-calibration", args.int8_calibration),
            ("--force", args.force or None),
        )
        if value is not None
    ]
    if given and not args.int8:
        raise ValueError(f"{', '.join(given)} only apply with --int8")
    if args.int8 and args.format == "safetensors":
        raise ValueError("--int8 writes an ONNX graph; drop --format safetensors")
    out = Path(args.out)
    if args.int8 and (out.is_dir() or out.suffix != ".onnx"):  # before a long export
        raise ValueError(
            f"--out {out}: --int8 writes an onnx file; name it such as model_int8.onnx"
        )
    if args.int8_calibration is not None and args.int8_calibration < 1:
        raise ValueError(f"--int8-calibration N needs N >= 1, got {args.int8_calibration}")
    tolerance = args.int8_tolerance
    if tolerance is not None and not abs(tolerance) < float("inf"):
        raise ValueError(f"--int8-tolerance must be a finite number of points, got {tolerance}")


def _export(args, artifact, out, ensemble: bool, inputs, bn, probe, device):
    from modeconn.export import export_ensemble, export_merged

    if ensemble:
        result = export_ensemble(
            artifact,
            out,
            args.ensemble,
            ts=args.ts,
            spacing=args.spacing,
            inputs=inputs,
            bn=bn,
            probe=probe,
            atol=args.atol,
            device=device,
        )
        m = result.manifest
        ts = ", ".join(f"{t:.4g}" for t in m["ts"])
        print(f"ensemble of {m['k']} members at t = [{ts}] (BatchNorm: {_bn(m['bn'])})")
    else:
        t = 0.5 if args.t is None else args.t
        result = export_merged(
            artifact,
            out,
            t,
            format=args.format,
            inputs=inputs,
            bn=bn,
            probe=probe,
            atol=args.atol,
            device=device,
        )
        print(f"merged model at t = {t:.4g} (BatchNorm: {_bn(result.manifest['bn'])})")
    check = (
        f", max |onnxruntime - torch| = {result.max_abs_diff:.2g}"
        if result.max_abs_diff is not None
        else ""
    )
    if not args.int8:
        print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.format}{check})")
    else:
        print(f"fp32 graph checked ({result.size_bytes / 1e6:.2f} MB{check})")
    return result


def _quantize(args, artifact, result, data) -> None:
    from modeconn.data import load_data
    from modeconn.quantize import calibration_sample, quantize_onnx

    if data is None:  # the data set the artifact was fitted on
        data = load_data(artifact.data_spec())
    calibration = calibration_sample(
        data.x_train.numpy(), args.int8_calibration or _CALIBRATION, seed=0
    )
    tolerance = _DEFAULT_TOLERANCE if args.int8_tolerance is None else args.int8_tolerance
    q = quantize_onnx(
        result.path,
        args.out,
        x_test=data.x_test.numpy(),
        y_test=data.y_test.numpy(),
        calibration=calibration,
        format=args.int8_format or "qoperator",
        tolerance=tolerance,
        force=args.force,
    )
    print(q.check.describe())
    if q.manifest["quantization"]["forced"]:
        print(f"accuracy drop over the tolerance of {tolerance:g} points: written (--force)")
    print(
        f"wrote {q.path} ({q.size_bytes / 1e6:.2f} MB, int8 {q.format}, "
        f"{q.size_bytes / q.fp32_size_bytes:.2f}x the fp32 size)"
    )


def _bn(sources) -> str:
    if isinstance(sources, str):
        return sources
    unique = sorted(set(sources))
    return unique[0] if len(unique) == 1 else ", ".join(sources)
