"""``modeconn align A B --out B_aligned.safetensors``: permute B onto A (Git Re-Basin).

Weight matching (Ainsworth et al. 2022): B's hidden units are permuted so that its weights
correlate best with A's. B's function is unchanged (checked on a probe batch); the straight
path from A to the permuted B is usually far flatter than the one to B.
"""

from __future__ import annotations

import argparse

from modeconn.commands._common import add_data, add_model, add_spec, load_pair, load_spec


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
        "--points", type=int, default=21, help="t values for the barrier before/after (0: skip)"
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
    if args.points:
        for label, end in (("before", b.state), ("after", state)):
            path = linear(model_parameters(model, a.state), model_parameters(model, end))
            ev = evaluate_path(model, path, data, points=args.points, progress=args.progress)
            print(
                f"straight-path barrier {label:6s}: train loss {ev.loss_barrier['mean']:.4f}, "
                f"test error {100 * ev.error_barrier['mean']:.2f} points"
            )
    return 0
