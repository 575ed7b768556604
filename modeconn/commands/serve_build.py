"""``modeconn serve-build DIR...``: build the ONNX graphs the HTTP service serves for artifacts.

    modeconn serve-build artifacts/paths/bezier                  # one artifact
    modeconn serve-build artifacts                               # every artifact below a folder
    modeconn serve-build DIR --k 2,4,8 --ts 0,0.5,1              # choose ensembles and merges
    modeconn serve-build DIR --cascade 8 --cascade-threshold 0.9 # the cascade's stop rule
    modeconn serve-build DIR --int8                              # int8 copies, checked on data

Writes ``DIR/serving/`` (one graph per K-member ensemble, one per merged model at t, and
``index.json`` with each graph's sha256), and by default a confidence cascade of 8 members
(merged graphs at the 8-member ensemble's t values, run one at a time; ``modeconn evaluate DIR
--cascade`` suggests a threshold); with ``--int8`` also an int8 copy of every graph, served as
``"precision": "int8"`` (calibrated on training inputs and checked against fp32 on the test
split of the artifact's data set, or of ``--data``; copies that lose more than
``--int8-tolerance`` accuracy points are skipped); ``bentoml serve service.service:ModeConnService`` loads
every artifact that has one. BatchNorm models get graphs only at the t values whose statistics
the artifact stores. A bundle is rebuilt when its artifact changed or a graph no longer matches
its sha256; temporary folders left by killed runs are removed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modeconn.cascade import RULES
from modeconn.commands._common import add_data, comma_list
from modeconn.commands.export import _DEFAULT_TOLERANCE


def _ints(text: str) -> list[int]:
    try:
        return comma_list(text, int, "expected comma-separated integers")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _floats(text: str) -> list[float]:
    try:
        return comma_list(text, float, "expected comma-separated numbers")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def register(sub) -> None:
    from modeconn.cascade import StopRule
    from modeconn.serving import DEFAULT_CASCADE, DEFAULT_KS, DEFAULT_MAX_ENSEMBLE_MB, DEFAULT_TS

    p = sub.add_parser(
        "serve-build",
        help="build the ONNX graphs the HTTP service serves",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "dirs", nargs="+", metavar="DIR", help="artifact directories, or folders of them"
    )
    p.add_argument(
        "--k",
        type=_ints,
        default=None,
        metavar="K,K",
        help=f"ensemble sizes (default: {','.join(map(str, DEFAULT_KS))}, or what an existing "
        "bundle holds; '' for none)",
    )
    p.add_argument(
        "--ts",
        type=_floats,
        default=None,
        metavar="T,T",
        help=f"t values of merged models (default: {','.join(map(str, DEFAULT_TS))}, or what an "
        "existing bundle holds; '' for none)",
    )
    p.add_argument(
        "--cascade",
        type=int,
        default=None,
        metavar="K",
        help=f"members of the confidence cascade served as mode 'cascade' (default: "
        f"{DEFAULT_CASCADE}, or what an existing bundle holds; 0 for none)",
    )
    p.add_argument(
        "--cascade-rule",
        choices=RULES,
        default=None,
        help=f"when an input leaves the cascade (default: {StopRule().rule}): its running mean's "
        "top probability reaches the threshold, or the first THRESHOLD members agree",
    )
    p.add_argument(
        "--cascade-threshold",
        type=float,
        default=None,
        metavar="X",
        help=f"the rule's threshold (default: {StopRule().threshold:g} for confidence; a "
        "request may give its own)",
    )
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write an int8 copy of every graph, checked against fp32 on the test split "
        "(default: what an existing bundle holds, else no)",
    )
    p.add_argument(
        "--int8-tolerance",
        type=float,
        default=None,
        metavar="POINTS",
        help="skip int8 copies whose test accuracy drops more than this (default: "
        f"{_DEFAULT_TOLERANCE})",
    )
    add_data(p, default=None)
    p.add_argument(
        "--max-ensemble-mb",
        type=float,
        default=DEFAULT_MAX_ENSEMBLE_MB,
        help="skip ensembles whose weights exceed this size (default: %(default)s)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild bundles even when up to date (with the K and t values each bundle holds, "
        "unless --k/--ts are given)",
    )
    p.add_argument(
        "--to-store",
        action="store_true",
        help="also save each artifact's bundle to the BentoML model store (serve with "
        "MODECONN_MODELS=TAG,...)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modeconn.serving import build_serving, find_artifacts, save_to_store

    if args.int8_tolerance is not None and not args.int8:
        raise ValueError("--int8-tolerance only applies with --int8")
    if args.data is not None and not args.int8:
        raise ValueError("--data is read only with --int8 (calibration and the int8 check)")
    data = None
    if args.data is not None:
        from modeconn.data import load_data

        data = load_data(args.data)

    targets: list[Path] = []
    for name in args.dirs:
        found = find_artifacts(name)
        if not found:
            raise ValueError(f"{name} holds no artifact (no manifest.json at or below it)")
        targets.extend(d for d in found if d not in targets)
    failed = []
    for directory in targets:
        try:
            index = build_serving(
                directory,
                ks=args.k,
                ts=args.ts,
                cascade=args.cascade,
                rule=args.cascade_rule,
                threshold=args.cascade_threshold,
                int8=args.int8,
                int8_tolerance=args.int8_tolerance,
                data=data,
                max_ensemble_mb=args.max_ensemble_mb,
                force=args.force,
            )
        except (ValueError, RuntimeError, FileNotFoundError) as err:
            if len(targets) == 1:
                raise
            print(f"{directory}: not built: {err}", file=sys.stderr)
            failed.append(directory)
            continue
        ens = ", ".join(str(k) for k in sorted(index.ensembles)) or "none"
        merged = ", ".join(f"{t:g}" for t in sorted(index.merged)) or "none"
        cascade = index.cascade
        stop = f"{cascade.k} members, {cascade.rule} {cascade.threshold:g}" if cascade else "none"
        print(f"{directory}: ensembles K = {ens}; merged t = {merged}; cascade: {stop}")
        for graph in index.int8:
            check = graph.int8_check or {}
            what = f"k={graph.k}" if graph.mode == "ensemble" else f"t={graph.ts[0]:g}"
            print(
                f"  int8 {graph.mode} {what}: top-1 agreement "
                f"{100 * check.get('agreement', 0):.2f} %, accuracy "
                f"{-check.get('accuracy_drop_points', 0):+.2f} points vs fp32"
            )
        for entry in index.skipped:
            what = f"k={entry['k']}" if "k" in entry else f"t={entry['t']:g}"
            precision = f" ({entry['precision']})" if "precision" in entry else ""
            print(f"  skipped {entry['mode']}{precision} {what}: {entry['reason']}")
        if args.to_store:
            print(f"  saved to the BentoML model store as {save_to_store(directory)}")
    if failed:
        raise ValueError(f"{len(failed)} of {len(targets)} artifacts could not be built")
    return 0
