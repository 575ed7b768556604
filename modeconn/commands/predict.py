"""``modeconn predict MODEL --images DIR --out preds.csv``: every image of a folder through a
path's ensemble or merged model, one CSV row per image.

    modeconn predict runs/bezier --images photos/ --out preds.csv           # K=8 ensemble
    modeconn predict runs/bezier --images photos/ --k 4 --out preds.csv
    modeconn predict runs/bezier --images photos/ --t 0.5 --out preds.csv   # merged midpoint
    modeconn predict bezier_k5.onnx --images photos/ --out preds.csv        # exported graph

MODEL is an artifact directory (run by torch; default: the K=8 ensemble the service answers
with a default bundle, fewer for a smaller FGE point set) or an ONNX file written by `modeconn
export` (run by onnxruntime, as exported: --k or --t may only repeat its own). The images
(.png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp, at any depth, hidden files skipped) are
preprocessed with the recipe the model was trained with, exactly as the HTTP service does.

Columns: file (relative to DIR), label, true (ImageFolder trees only), p_<class> for every
class (named by the data set's classes, else 0..C-1), entropy, and for an ensemble
mutual_information and disagreement. When DIR is an ImageFolder tree of the model's classes (no
image directly in DIR, each subfolder named after a class), accuracy, NLL, ECE and Brier are
printed too. An image that cannot be read is skipped and named in a warning, so one bad file
does not cost the rest (--strict: stop instead). The CSV is written atomically.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modeconn.commands._common import add_device, check_data_fits, resolve_device
from modeconn.serving import DEFAULT_KS

log = logging.getLogger("modeconn")

#: The ensemble size without --k or --t: the largest that `serve-build` builds by default,
#: which the service answers when no k is asked.
DEFAULT_K = max(DEFAULT_KS)
#: Skipped images named in the warning; the rest are counted.
_NAMED = 10
#: ``modeconn.ensemble.UNCERTAINTY``: the columns of the ensembles' per-input uncertainty.
_UNCERTAINTY = ("entropy", "mutual_information", "disagreement")

#: inputs (N, *input_shape) -> probabilities (N, C), log-probabilities (N, C), uncertainty (N, 3)
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def register(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="predict a folder of images with an ensemble or merged model (CSV)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="ARTIFACT_OR_ONNX", help="artifact directory or .onnx file")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--k",
        type=int,
        metavar="K",
        help=f"ensemble of K members evenly spaced in t (default: {DEFAULT_K})",
    )
    what.add_argument("--t", type=float, metavar="T", help="the merged model at t in [0, 1]")
    p.add_argument("--out", required=True, metavar="F.csv", help="CSV file to write")
    p.add_argument(
        "--batch-size", type=int, default=256, help="images per batch (default: %(default)s)"
    )
    p.add_argument(
        "--invert",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="invert grayscale images (default: decided from each image's border for data "
        "sets drawn in ink, such as digits; never for image folders)",
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at an unreadable image instead of skipping it"
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="SPEC",
        help="training data, to recompute BatchNorm statistics at t values the artifact does "
        "not store (artifacts only)",
    )
    add_device(p)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class _Model:
    """What predicting needs to know about a model, read before any image."""

    describe: str  # e.g. "ensemble of 4 members at t = 0, 0.333, 0.667, 1"
    preprocessing: dict
    input_shape: tuple[int, ...]
    num_classes: int
    ensemble: bool  # whether mutual information and disagreement mean anything
    build: Callable[[], Runner]  # the (possibly slow) model, built once the images are listed


def run(args: argparse.Namespace) -> int:
    from modeconn.images import class_names, list_folder

    if args.k is not None and args.k < 1:
        raise ValueError(f"--k K needs K >= 1 (the number of ensemble members), got {args.k}")
    if args.t is not None and not 0.0 <= args.t <= 1.0:  # also refuses NaN
        raise ValueError(f"--t must lie in [0, 1] (0: endpoint A, 1: endpoint B), got {args.t}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a directory; give a file name such as preds.csv")
    device = resolve_device(args.device)
    source = Path(args.model)
    if source.is_dir():
        model = _artifact(source, args, device)
    elif source.suffix.lower() == ".onnx" and source.is_file():
        if args.data:
            raise ValueError("--data is for artifact directories; an ONNX file holds its model")
        model = _onnx(source, args, "cpu" if device.type == "cpu" else "cuda")
    elif not source.exists():
        raise FileNotFoundError(f"{source}: no such artifact directory or ONNX file")
    else:
        raise ValueError(
            f"{source} is neither an artifact directory nor an .onnx file (`modeconn export` "
            "writes one)"
        )
    kind = model.preprocessing.get("kind", "unknown")
    if kind != "image":
        raise ValueError(
            f"{source} was not trained on images (its data preprocessing is {kind!r}); "
            "predict reads image files only"
        )
    classes = class_names(model.preprocessing, model.num_classes)
    listing = list_folder(args.images, classes)
    probs, log_probs, uncertainty, kept = _predict(listing, model, args)
    labels = probs.argmax(-1)  # (N,)
    truth = None if listing.labels is None else np.array([listing.labels[i] for i in kept])
    names = [listing.names[i] for i in kept]
    _write_csv(args.out, names, classes, labels, truth, probs, uncertainty, model.ensemble)
    print(f"wrote {args.out}: {len(kept)} images, {model.describe}")
    if truth is not None:
        _print_metrics(probs, log_probs, labels, truth, len(set(truth.tolist())))
    return 0


# ---------------------------------------------------------------------------------------------
# The two kinds of model


def _artifact(directory: Path, args: argparse.Namespace, device) -> _Model:
    from modeconn.formats import read_manifest

    manifest = read_manifest(directory)  # cheap: the weights are read once the images are listed
    ts, k = ([float(args.t)], None) if args.t is not None else (None, args.k)
    if ts is None and k is None:  # a point set (FGE) has as many members as nodes
        k = min(DEFAULT_K, manifest.num_nodes) if manifest.kind == "points" else DEFAULT_K
    spacing = "of the FGE point set" if manifest.kind == "points" else "evenly spaced in t"
    members = f"{k} member{'s' if k != 1 else ''}"
    describe = f"merged model at t = {args.t:g}" if ts else f"ensemble of {members} {spacing}"

    def build() -> Runner:
        import torch

        from modeconn.artifact import load_artifact
        from modeconn.checkpoint import Checkpoint
        from modeconn.data import load_data
        from modeconn.ensemble import Ensemble

        artifact = load_artifact(directory)
        inputs = None
        if args.data:
            data = load_data(args.data)
            spec = artifact.manifest.model_spec()
            check_data_fits(data, Checkpoint(state={}, model=spec, meta={"file": str(directory)}))
            inputs = data.x_train
        ensemble = Ensemble.from_artifact(artifact, k, ts=ts, inputs=inputs, device=device)

        def runner(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            pred = ensemble.predict(torch.from_numpy(x))
            return pred.probs.numpy(), pred.log_probs.numpy(), pred.uncertainty.numpy()

        return runner

    return _Model(
        describe=f"{describe} along {directory} (torch)",
        preprocessing=manifest.preprocessing,
        input_shape=tuple(manifest.model.input_shape),
        num_classes=manifest.model.num_classes,
        ensemble=ts is None and k != 1,
        build=build,
    )


def _onnx(file: Path, args: argparse.Namespace, device) -> _Model:
    from modeconn.formats import match_t
    from modeconn.runtime import OnnxModel

    onnx = OnnxModel(file, device=device, name=file.name)
    ts, ensemble = onnx.ts, "uncertainty" in onnx.output_names
    if "probabilities" not in onnx.output_names:
        raise ValueError(f"{file} has no 'probabilities' output: not a graph of `modeconn export`")
    shown = ", ".join(f"{t:.3g}" for t in ts)
    describe = (
        f"ensemble of {len(ts) or '?'} members at t = {shown}"
        if ensemble
        else f"merged model at t = {shown}"
    )
    if args.k is not None and not (ensemble and args.k == len(ts)):
        raise ValueError(
            f"--k {args.k}: {file} holds the {describe} and runs as it was exported; drop --k, "
            f"or export the ensemble you want (`modeconn export DIR --ensemble {args.k}`)"
        )
    if args.t is not None and (ensemble or match_t(args.t, ts) is None):
        raise ValueError(
            f"--t {args.t:g}: {file} holds the {describe} and runs as it was exported; drop "
            f"--t, or export the merged model you want (`modeconn export DIR --t {args.t:g}`)"
        )
    num_classes = onnx.num_classes or onnx.session.get_outputs()[0].shape[-1]
    if not isinstance(num_classes, int):
        raise ValueError(f"{file} does not say how many classes it predicts")

    def runner(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = onnx.run(x)
        probs = out["probabilities"]  # (N, C)
        log_probs = out.get("log_probabilities")
        if log_probs is None:
            log_probs = np.log(np.clip(probs, np.finfo(np.float32).tiny, None))
        if "uncertainty" in out:
            return probs, log_probs, out["uncertainty"]  # (N, 3)
        entropy = -(probs * log_probs).sum(-1)  # (N,)
        return probs, log_probs, np.stack([entropy, 0 * entropy, 0 * entropy], -1)

    return _Model(
        describe=f"{describe} from {file} (onnxruntime, {onnx.provider})",
        preprocessing=onnx.preprocessing,
        input_shape=onnx.input_shape,
        num_classes=int(num_classes),
        ensemble=ensemble,
        build=lambda: runner,
    )


# ---------------------------------------------------------------------------------------------
# Images in, predictions out


def _predict(listing, model: _Model, args: argparse.Namespace):
    """Probabilities, log-probabilities and uncertainty of every readable image, and the
    indices (into the listing) of those images."""
    from modeconn.images import prepare_image, read_image
    from modeconn.progress import progress_bar

    runner = model.build()
    n, size = len(listing.files), args.batch_size
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    kept: list[int] = []
    skipped: list[str] = []
    with progress_bar(math.ceil(n / size), "predict", enabled=args.progress) as bar:
        for begin in range(0, n, size):
            inputs = []
            for i in range(begin, min(begin + size, n)):
                try:
                    image = read_image(listing.files[i])
                    x = prepare_image(
                        image, model.preprocessing, model.input_shape, invert=args.invert
                    )
                except ValueError as err:
                    if args.strict:
                        raise ValueError(
                            f"{err} (--strict: stopped at the first bad image)"
                        ) from None
                    skipped.append(str(err))
                    continue
                inputs.append(x)  # (1, *input_shape)
                kept.append(i)
            if inputs:
                parts.append(runner(np.concatenate(inputs)))
            bar.advance(1, images=len(kept))
    if skipped:
        more = f" (and {len(skipped) - _NAMED} more)" if len(skipped) > _NAMED else ""
        log.warning(
            "skipped %d unreadable image%s: %s%s",
            len(skipped),
            "s" if len(skipped) > 1 else "",
            "; ".join(skipped[:_NAMED]),
            more,
        )
    if not kept:
        raise ValueError(
            f"none of the {n} images in {listing.root} could be read (first: {skipped[0]})"
        )
    probs, log_probs, uncertainty = (np.concatenate(arrays) for arrays in zip(*parts))
    return probs, log_probs, uncertainty, kept


def _write_csv(
    out: str,
    names: list[str],
    classes: list[str],
    labels: np.ndarray,
    truth: np.ndarray | None,
    probs: np.ndarray,
    uncertainty: np.ndarray,
    ensemble: bool,
) -> None:
    from modeconn.io import atomic_file

    columns = list(_UNCERTAINTY if ensemble else _UNCERTAINTY[:1])
    header = ["file", "label", *(["true"] if truth is not None else [])]
    header += [f"p_{name}" for name in classes] + columns
    with atomic_file(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i, name in enumerate(names):
            row = [name, classes[labels[i]]]
            if truth is not None:
                row.append(classes[truth[i]])
            row += [f"{v:.6g}" for v in probs[i]]
            row += [f"{v:.6g}" for v in uncertainty[i, : len(columns)]]
            writer.writerow(row)


def _print_metrics(
    probs: np.ndarray, log_probs: np.ndarray, labels: np.ndarray, truth: np.ndarray, present: int
) -> None:
    import torch

    from modeconn.metrics import brier, ece, nll

    p = torch.from_numpy(probs.astype(np.float64))  # (N, C)
    y = torch.from_numpy(truth.astype(np.int64))  # (N,)
    accuracy = float((labels == truth).mean())
    print(
        f"labelled by folder ({len(truth)} images of {present} classes): "
        f"accuracy {100 * accuracy:.2f}%  NLL {nll(torch.from_numpy(log_probs), y):.4f}  "
        f"ECE {100 * ece(p, y):.2f}%  Brier {brier(p, y):.4f}"
    )
