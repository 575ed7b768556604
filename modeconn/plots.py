"""Figures: metrics along t for one or several paths. Written with matplotlib's Agg backend."""

from __future__ import annotations

import os

from modeconn.io import atomic_file

__all__ = ["plot_paths", "plot_ensembles"]


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
    ax_loss.set(xlabel="t", ylabel="loss (cross-entropy, log scale)", title="loss along the path")
    # Log scale: a flat path's loss is orders of magnitude below the straight line's barrier.
    ax_loss.set_yscale("log")
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


def plot_ensembles(
    results: dict[str, list[dict]], out: str | os.PathLike, *, title: str = ""
) -> None:
    """Accuracy and NLL against ensemble size K, and a reliability diagram.

    ``results`` maps an artifact's label to its rows (``Row.to_json()``). Ensembles are lines
    over K; endpoints and midpoints are horizontal references (first artifact only, to keep the
    picture readable when several paths share endpoints).
    """
    plt = _pyplot()
    fig, (ax_acc, ax_nll, ax_rel) = plt.subplots(1, 3, figsize=(15, 4.3), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # reference lines: (line style, colour); the path midpoint takes the artifact's colour
    styles = {
        "endpoint A": (":", "dimgray"),
        "endpoint B": (":", "black"),
        "A+B ensemble": ("-.", "tab:purple"),
        "straight midpoint": ("--", "tab:red"),
    }
    for i, (label, rows) in enumerate(results.items()):
        color = colors[i % len(colors)]
        ens = sorted((r for r in rows if r["group"] == "ensemble"), key=lambda r: r["k"])
        if ens:
            ks = [r["k"] for r in ens]
            ax_acc.plot(
                ks,
                [100 * r["accuracy"] for r in ens],
                "o-",
                color=color,
                lw=2,
                label=f"{label} ensemble",
            )
            ax_nll.plot(
                ks, [r["nll"] for r in ens], "o-", color=color, lw=2, label=f"{label} ensemble"
            )
        for r in rows:
            if r["group"] == "ensemble" or (i > 0 and r["label"] != "path midpoint"):
                continue
            ls, ref_color = styles.get(r["label"], ("--", color))
            name = r["label"] if r["label"] != "path midpoint" else f"{label} midpoint"
            ax_acc.axhline(100 * r["accuracy"], ls=ls, color=ref_color, lw=1, label=name)
            ax_nll.axhline(r["nll"], ls=ls, color=ref_color, lw=1, label=name)
        # Reliability of this artifact's largest ensemble, and of endpoint A for the first one.
        picks = ([r for r in rows if r["label"] == "endpoint A"] if i == 0 else []) + ens[-1:]
        for r in picks:
            rel = r["reliability"]
            pts = [
                (c, a) for c, a, n in zip(rel["confidence"], rel["accuracy"], rel["count"]) if n > 0
            ]
            if pts:
                xs, ys = zip(*pts)
                sizes = [n for n in rel["count"] if n > 0]
                ax_rel.scatter(
                    xs,
                    ys,
                    s=[8 + 60 * n / max(sizes) for n in sizes],
                    color=color if r["group"] == "ensemble" else "gray",
                    alpha=0.6,
                )
                name = r["label"] if r["group"] != "ensemble" else f"{label} K={r['k']}"
                ax_rel.plot(
                    xs,
                    ys,
                    "o-" if r["group"] == "ensemble" else "s:",
                    color=color if r["group"] == "ensemble" else "gray",
                    label=f"{name} (ECE {100 * r['ece']:.1f}%)",
                )
    ax_rel.plot([0, 1], [0, 1], color="black", lw=0.8, alpha=0.5)
    ax_acc.set(xlabel="ensemble size K", ylabel="test accuracy (%)", title="accuracy against K")
    ax_nll.set(xlabel="ensemble size K", ylabel="test NLL", title="NLL against K")
    ax_rel.set(
        xlabel="confidence",
        ylabel="accuracy",
        title="reliability (15 bins; marker area ~ count)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    for ax in (ax_acc, ax_nll, ax_rel):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
