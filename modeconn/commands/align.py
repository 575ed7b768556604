"""``modeconn align A B --out B_aligned.safetensors``: permute B onto A (Git Re-Basin).

Weight matching (Ainsworth et al. 2022): B's hidden units are permuted so that its weights
correlate best with A's. B's function is unchanged (checked on a probe batch); the straight
path from A to the permuted B is usually far flatter than the one to B.

The report of that barrier, before and after, is cheap by default (``--report quick``): 5 points
on each straight path, with BatchNorm statistics recomputed and the train loss measured on a fixed,
seeded subset of the training inputs (and of the test inputs for a big test set).
``--report full`` recomputes them on all the data at 21 points, ``--report none`` skips it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from modeconn.commands._common import add_data, add_model, add_spec, load_pair, load_spec

if TYPE_CHECKING:
    from torch import nn

    from modeconn.data import Dataset

#: What ``--report quick`` measures: points on each path, and the sizes of the seeded subsets
#: of training inputs (BN statistics and train loss) and test inputs (test error).
QUICK_POINTS, QUICK_TRAIN, QUICK_TEST, QUICK_SEED = 5, 512, 2048, 0
FULL_POINTS = 21


def register(sub) -> None:
    p = sub.add_parser("align", help="permute B onto A by weight matching", description=__doc__)
    p.add_argument("a", help="endpoint A (.safetensors, or a plain state dict with --model)")
    p.add_argument("b", help="endpoint B, to be permuted")
    p.add_argument("--out", required=True, help="output .safetensors file for the permuted B")
    add_data(p, default=None)
    add_model(p)
    add_spec(p)
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the order in which groups are visited"
    )
    p.add_argument(
        "--max-iter", type=int, default=100, help="maximum number of sweeps (default: 100)"
    )
    p.add_argument(
        "--report",
        choices=("quick", "full", "none"),
        default="quick",
        help=f"straight-path barrier before/after: quick ({QUICK_POINTS} points, BN statistics "
        f"and train loss from {QUICK_TRAIN} seeded training inputs, test error on at most "
        f"{QUICK_TEST} test inputs), full ({FULL_POINTS} points on all the data) or none "
        "(default: quick)",
    )
    p.add_argument(
        "--points",
        type=int,
        default=None,
        help=f"t values of the report (default: {QUICK_POINTS} quick, {FULL_POINTS} full; "
        "0: no report)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modeconn.checkpoint import save_checkpoint
    from modeconn.evaluate import evaluate_path
    from modeconn.fit.objective import model_parameters
    from modeconn.paths import linear
    from modeconn.pipeline import align_endpoints

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must name a .safetensors file, got {args.out!r}")
    if args.max_iter < 1:
        raise ValueError(f"--max-iter must be >= 1, got {args.max_iter}")
    points = args.points
    if points is None:
        points = {"quick": QUICK_POINTS, "full": FULL_POINTS, "none": 0}[args.report]
    if points < 0 or points == 1:
        raise ValueError(f"--points must be 0 (no report) or >= 2 (t=0 and t=1), got {points}")
    a, b, data = load_pair(args.a, args.b, args)
    state, record = align_endpoints(
        a, b, data, seed=args.seed, max_iter=args.max_iter, spec=load_spec(args.spec)
    )
    model = a.build_model()
    save_checkpoint(
        args.out,
        model,
        state=state,
        **{k: v for k, v in b.meta.items() if k not in ("file", "model", "format")},
        aligned_to=a.path_name,
        alignment=record,
    )
    print(
        f"{args.out}: B permuted onto A in {record['sweeps']} sweeps ({record['seconds']:.3f}s), "
        f"objective {record['objective_start']:.4g} -> {record['objective_end']:.4g}"
    )
    if points and args.report != "none":
        quick = args.report == "quick"
        subset = _quick_subset(data) if quick else data
        print(_describe_report(args.report, points, model, data, subset))
        for label, end in (("before", b.state), ("after", state)):
            path = linear(model_parameters(model, a.state), model_parameters(model, end))
            ev = evaluate_path(model, path, subset, points=points, progress=args.progress)
            print(
                f"straight-path barrier {label:6s}: train loss {ev.loss_barrier['mean']:.4f}, "
                f"test error {100 * ev.error_barrier['mean']:.2f} points"
            )
    return 0


def _quick_subset(data: Dataset) -> Dataset:
    """The data with ``QUICK_TRAIN`` training and ``QUICK_TEST`` test examples, seeded, in order."""
    import dataclasses

    import torch

    generator = torch.Generator().manual_seed(QUICK_SEED)

    def pick(n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=generator)[:k].sort().values  # (min(n, k),)

    train = pick(len(data.y_train), QUICK_TRAIN)
    test = pick(len(data.y_test), QUICK_TEST)
    return dataclasses.replace(
        data,
        x_train=data.x_train[train],
        y_train=data.y_train[train],
        x_test=data.x_test[test],
        y_test=data.y_test[test],
    )


def _describe_report(
    report: str, points: int, model: nn.Module, data: Dataset, subset: Dataset
) -> str:
    """One line saying what the two barrier lines below it measured."""
    from modeconn.bn import has_batchnorm

    if points <= 6:
        where = "t = " + ", ".join(f"{i / (points - 1):g}" for i in range(points))
    else:
        where = f"{points} evenly spaced t from 0 to 1"
    n_train, n_test = len(subset.y_train), len(subset.y_test)
    train = "all" if n_train == len(data.y_train) else f"{n_train} seeded of"
    test = "all" if n_test == len(data.y_test) else f"{n_test} seeded of"
    measured = (
        "BN statistics (recomputed at each t) and train loss"
        if has_batchnorm(model)
        else "train loss"
    )
    text = (
        f"{report} report on each straight path, {where}: {measured} from {train} "
        f"{len(data.y_train)} training inputs, test error on {test} {len(data.y_test)} test inputs"
    )
    if report == "quick":
        text += f" (--report full: {FULL_POINTS} points on all the data)"
    return text
