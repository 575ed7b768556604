"""``modeconn export DIR``: a path's ensemble or merged model as one ONNX file (or safetensors).

    modeconn export DIR --ensemble 5 --out model.onnx            # K members evenly in t
    modeconn export DIR --ts 0 0.3 0.7 1 --out model.onnx         # members at given t values
    modeconn export DIR --ensemble 5 --spacing arclength --data digits --out model.onnx
    modeconn export DIR --t 0.5 --out merged.onnx                 # the merged midpoint
    modeconn export DIR --t 0.5 --format safetensors --out merged.safetensors

BatchNorm statistics come from the artifact for its served t values; other t values need
``--data`` (the training inputs) to recompute them, from the seeded subset the artifact records
(``--bn-examples`` for another).
"""

from __future__ import annotations

import argparse

from modeconn.commands._common import (
    add_bn_examples,
    add_device,
    bn_examples_for,
    check_data_fits,
    resolve_device,
)


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
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modeconn.artifact import load_artifact
    from modeconn.checkpoint import Checkpoint
    from modeconn.data import load_data
    from modeconn.export import export_ensemble, export_merged

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
    device = resolve_device(args.device)
    artifact = load_artifact(args.dir)  # a corrupt artifact fails here, before any file exists
    if args.bn_examples is not None:  # instead of the artifact's own
        m = artifact.manifest
        artifact.manifest = m.model_copy(
            update={"bn_examples": bn_examples_for(args, m.bn_examples)}
        )
    inputs = probe = None
    if args.data:
        data = load_data(args.data)
        check_data_fits(
            data,
            Checkpoint(state={}, model=artifact.manifest.model_spec(), meta={"file": args.dir}),
        )
        inputs, probe = data.x_train, data.x_test[:64]
    bn = "recompute" if args.recompute_bn else "auto"
    if ensemble:
        result = export_ensemble(
            artifact,
            args.out,
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
            args.out,
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
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.format}{check})")
    return 0


def _bn(sources) -> str:
    if isinstance(sources, str):
        return sources
    unique = sorted(set(sources))
    return unique[0] if len(unique) == 1 else ", ".join(sources)
