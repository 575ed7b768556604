"""``modeconn train``: train one endpoint and save it as a self-describing safetensors file.

Under ``torchrun`` the training is data-parallel; rank 0 writes the file and reports.
"""

from __future__ import annotations

import argparse
import time

from modeconn.commands._common import add_data, add_device, add_model, model_spec, resolve_device

#: ``modeconn.train.TrainConfig``'s defaults, for the help without torch (checked by
#: tests/test_cli_help.py).
TRAIN_DEFAULTS = {"epochs": 100, "lr": 0.05, "batch_size": 128, "weight_decay": 5e-4}


def register(sub) -> None:
    p = sub.add_parser("train", help="train an endpoint network", description=__doc__)
    add_model(p, default="mlp")
    add_data(p)
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    p.add_argument("--epochs", type=int, default=TRAIN_DEFAULTS["epochs"])
    p.add_argument(
        "--lr", type=float, default=TRAIN_DEFAULTS["lr"], help="peak learning rate (cosine decay)"
    )
    p.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    p.add_argument("--wd", type=float, default=TRAIN_DEFAULTS["weight_decay"], help="weight decay")
    add_device(p)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from modeconn import distributed
    from modeconn.checkpoint import save_checkpoint
    from modeconn.data import load_data
    from modeconn.formats import absolute_data_spec
    from modeconn.train import TrainConfig, train_model

    device = resolve_device(args.device)
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must name a .safetensors file, got {args.out!r}")
    data = load_data(args.data)
    config = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.wd,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    model = model_spec(args, data).build()
    start = time.perf_counter()
    metrics = train_model(model, data, config, device=device, progress=args.progress)
    seconds = time.perf_counter() - start
    with distributed.main_first() as main:  # the ranks hold the same weights: one writes them
        if main:
            save_checkpoint(
                args.out,
                model.cpu(),
                data=absolute_data_spec(data.name),  # found from any working directory
                data_fingerprint=data.fingerprint(),
                seed=args.seed,
                train=config.__dict__,
                metrics=metrics,
                seconds=round(seconds, 2),
            )
    if not main:
        return 0
    print(
        f"{args.out}: {args.model} seed {args.seed}, {args.epochs} epochs in {seconds:.1f}s: "
        f"train acc {metrics['train_acc']:.4f} loss {metrics['train_loss']:.4f}, "
        f"test acc {metrics['test_acc']:.4f} loss {metrics['test_loss']:.4f}"
    )
    return 0
