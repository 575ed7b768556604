"""Figures: metrics along t for one or several paths. Written with matplotlib's Agg backend."""

from __future__ import annotations

import os

from modeconn.io import atomic_file

__all__ = ["plot_paths"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_paths(curves: dict[str, dict], out: str | os.PathLike, *, title: str = "") -> None:
    """Train/test loss and test error along t, one line style per path.

    ``curves`` maps a label to a path evaluation as JSON (``PathEvaluation.to_json()``).
    """
    plt = _pyplot()
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, ev) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        ts = ev["ts"]
        ax_loss.plot(ts, ev["train_loss"], color=color, lw=2, label=f"{label} train")
        ax_loss.plot(ts, ev["test_loss"], color=color, lw=1.2, ls="--", label=f"{label} test")
        ax_err.plot(
            ts, [100 * (1 - a) for a in ev["train_acc"]], color=color, lw=2, label=f"{label} train"
        )
        ax_err.plot(
            ts,
            [100 * (1 - a) for a in ev["test_acc"]],
            color=color,
            lw=1.2,
            ls="--",
            label=f"{label} test",
        )
    ax_loss.set(xlabel="t", ylabel="loss (cross-entropy)", title="loss along the path")
    ax_err.set(xlabel="t", ylabel="error (%)", title="error along the path")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1)
    ax_loss.legend(fontsize=8, ncol=1 if len(curves) < 4 else 2)
    if title:
        fig.suptitle(title)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
