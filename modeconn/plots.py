"""Figures: metrics along t for one or several paths, and ensembles against K.

Written with matplotlib's Agg backend. Every figure keeps its legends outside the data area,
gives each path its own colour *and* marker (train: solid line, filled markers; test: dashed,
open markers), and keeps its axes on what matters: a curve or a reference far off the others
(the unaligned straight line's error, the straight-line midpoint of an ensemble plot) is marked
at the edge with its value instead of stretching the axis until the rest is a flat line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from modeconn.io import atomic_file
from modeconn.metrics import barriers

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_paths",
    "plot_ensembles",
    "plot_cascade",
    "paths_figure",
    "ensembles_figure",
    "cascade_figure",
]

# tab10 without its grey (kept for references) and with its olive last: 9 colours; with 11
# markers every (colour, marker) pair differs for the first 99 paths.
_COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:cyan",
    "tab:olive",
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")

#: A curve or reference further than this many "core spans" from the others is off scale.
_OFF_SCALE = 3.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(i: int) -> tuple[str, str]:
    """Colour and marker of the i-th path."""
    return _COLORS[i % len(_COLORS)], _MARKERS[i % len(_MARKERS)]


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _positive(values: Sequence[float]) -> list[float]:
    """Values for a log axis: zero, negative or non-finite ones become gaps (NaN)."""
    return [v if v is not None and math.isfinite(v) and v > 0 else math.nan for v in values]


def _line(ax: Axes, xs: Sequence[float], ys: Sequence[float], **style) -> None:
    """``ax.plot`` that skips a series with no finite point (matplotlib cannot place its
    markers: ``markevery`` by distance fails on an empty line)."""
    if _finite(ys):
        ax.plot(xs, ys, **style)


def _rank_key(ev: dict) -> tuple[bool, float, float, float]:
    """How ``modeconn.compare.rank_rows`` orders paths: the train-loss barrier above the
    endpoints' chord, then the test-error one, then the worst test error; NaN last."""

    def chord(values: list[float]) -> float:
        try:
            return barriers(values, ts=ev["ts"])["linear"]
        except (ValueError, KeyError):
            return math.nan

    loss = chord(ev.get("train_loss", []))
    error = chord([1 - a for a in ev.get("test_acc", [])])
    worst = max(_finite(1 - a for a in ev.get("test_acc", [])), default=math.nan)
    loss_, error_, worst_ = (math.inf if math.isnan(x) else x for x in (loss, error, worst))
    return math.isnan(loss), loss_, error_, worst_


def _save(fig: Figure, out: str | os.PathLike) -> None:
    plt = _pyplot()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _zoom_top(peaks: dict[str, float]) -> tuple[float | None, list[str]]:
    """Upper y-limit for curves with these peaks, and the curves it leaves off scale.

    The lowest peak sets the scale; a peak above ``max(3 x lowest, lowest + 10)`` (percentage
    points) is off scale. ``None`` when every curve fits (autoscale).
    """
    finite = {k: v for k, v in peaks.items() if math.isfinite(v)}
    if len(finite) < 2:
        return None, []
    low = min(finite.values())
    limit = max(_OFF_SCALE * low, low + 10.0)
    off = [k for k, v in finite.items() if v > limit]
    if not off:
        return None, []
    top = max(v for k, v in finite.items() if k not in off)
    return top * 1.1 + 0.5, off


def paths_figure(curves: dict[str, dict], *, title: str = "") -> Figure:
    """The figure of :func:`plot_paths`, for saving elsewhere or showing in a notebook."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    n = max(len(curves), 1)
    peaks: dict[str, float] = {}
    peak_at: dict[str, float] = {}
    colors: dict[str, str] = {}
    handles: list[tuple[tuple, Line2D]] = []
    for i, (label, ev) in enumerate(curves.items()):
        color, marker = _style(i)
        colors[label] = color
        ts = ev["ts"]
        # markers every tenth of the line, staggered per path so coinciding curves stay apart
        common = dict(color=color, marker=marker, ms=5, markevery=(0.1 * i / n, 0.1))
        train = dict(common, lw=2.0, ls="-")
        test = dict(common, lw=1.3, ls="--", mfc="white")
        _line(ax_loss, ts, _positive(ev["train_loss"]), **train)
        _line(ax_loss, ts, _positive(ev["test_loss"]), **test)
        train_err = [100 * (1 - a) for a in ev["train_acc"]]
        test_err = [100 * (1 - a) for a in ev["test_acc"]]
        _line(ax_err, ts, train_err, **train)
        _line(ax_err, ts, test_err, **test)
        both = [(e, t) for e, t in zip(train_err + test_err, list(ts) * 2) if math.isfinite(e)]
        if both:
            peaks[label], peak_at[label] = max(both)
        key = _rank_key(ev)
        text = "n/a" if key[0] else f"{key[1]:.3g}"  # the train-loss barrier
        proxy = Line2D([], [], color=color, marker=marker, lw=2, label=f"{label}  ({text})")
        handles.append((key, proxy))

    # Log scale: a flat path's loss is orders of magnitude below the straight line's barrier.
    if any(_finite(_positive(line.get_ydata())) for line in ax_loss.get_lines()):
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="t", ylabel="cross-entropy (log scale)", title="loss along the path")
    ax_err.set(xlabel="t", ylabel="error (%)", title="error along the path")
    top, off = _zoom_top(peaks)
    if top is not None:
        ax_err.set_ylim(-0.03 * top, top)
        # the clipped curves run off the top: mark where each peaks, and say how high
        for label in off:
            ax_err.plot(
                [peak_at[label]], [top], marker="^", ms=9, color=colors[label], clip_on=False
            )
        ax_err.set_title(
            "error along the path (zoomed; off scale: "
            + ", ".join(f"{label} ▲ {peaks[label]:.1f}%" for label in off)
            + ")",
            fontsize="medium",
        )
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1)

    # One legend for both panels, outside on the right: the paths ranked by barrier, then what
    # the line styles mean.
    ranked = [h for _, h in sorted(handles, key=lambda kh: kh[0])]
    styles = [
        Line2D([], [], ls="none", label=" "),  # a gap between the paths and the styles
        Line2D([], [], color="gray", marker="o", lw=2, ls="-", label="train (solid)"),
        Line2D(
            [], [], color="gray", marker="o", mfc="white", lw=1.3, ls="--", label="test (dashed)"
        ),
    ]
    fig.legend(
        handles=ranked + styles,
        loc="outside right upper",
        fontsize=8,
        title="path (train-loss barrier\nabove the endpoints' chord)",
        title_fontsize=8,
    )
    if title:
        fig.suptitle(title)
    return fig


def plot_paths(curves: dict[str, dict], out: str | os.PathLike, *, title: str = "") -> None:
    """Train/test loss (log scale) and error along t, one colour and marker per path.

    ``curves`` maps a label to a path evaluation as JSON (``PathEvaluation.to_json()``). The
    legend, outside on the right, lists the paths by their train-loss barrier above the chord
    of the endpoint losses. The error panel is zoomed on the paths that stay low; one that
    rises far above them (the unaligned straight line) is marked off scale with its peak.
    """
    _save(paths_figure(curves, title=title), out)


# -- ensembles ------------------------------------------------------------------------------

# reference lines shared by the artifacts: (line style, colour)
_REFERENCES = {
    "endpoint A": (":", "dimgray"),
    "endpoint B": (":", "black"),
    "A+B ensemble": ("-.", "tab:gray"),
    "straight midpoint": ((0, (5, 2, 1, 2)), "darkred"),
}


def _limits(core: list[float], floor: float) -> tuple[float, float, float]:
    """Bounds of the core values and their span (at least ``floor``)."""
    lo, hi = min(core), max(core)
    return lo, hi, max(hi - lo, floor)


def _reference_lines(
    ax: Axes, refs: list[tuple[str, float, object, str]], core: list[float], floor: float, fmt
) -> dict[str, str]:
    """Draw horizontal references near the core values; mark the others at the edge.

    Returns the legend suffix of each off-scale reference (its value and where it lies).
    """
    off: dict[str, str] = {}
    if not core:
        core = _finite(v for _, v, _, _ in refs)
    if not core:
        return off
    lo, hi, span = _limits(core, floor)
    pad = 0.12 * span
    bottom, top = lo - pad, hi + pad
    near: list[float] = []
    for name, value, ls, color in refs:
        if not math.isfinite(value):
            off[name] = " (n/a)"
            continue
        if lo - _OFF_SCALE * span <= value <= hi + _OFF_SCALE * span:
            ax.axhline(value, ls=ls, color=color, lw=1.2)
            near.append(value)
        else:
            off[name] = f" {fmt(value)} ({'below' if value < lo else 'above'}, off scale)"
    if near:
        bottom, top = min(bottom, min(near) - pad), max(top, max(near) + pad)
    ax.set_ylim(bottom, top)
    for name, value, _, color in refs:
        if name in off and math.isfinite(value):
            # a triangle on the edge, at the right end, pointing to where the line would be
            ax.plot(
                [1.0],
                [0.0 if value < lo else 1.0],
                marker="v" if value < lo else "^",
                ms=9,
                color=color,
                transform=ax.transAxes,
                clip_on=False,
            )
    return off


def _reliability(ax: Axes, rows: list[tuple[str, dict, str, str, str]]) -> None:
    """Reliability points (marker area ~ bin count) with thin lines, one series per row."""
    for name, row, color, marker, ls in rows:
        rel = row["reliability"]
        pts = [
            (c, a, n) for c, a, n in zip(rel["confidence"], rel["accuracy"], rel["count"]) if n > 0
        ]
        if not pts:
            continue
        xs, ys, ns = zip(*pts)
        biggest = max(ns)
        ax.scatter(
            xs, ys, s=[10 + 90 * k / biggest for k in ns], color=color, marker=marker, alpha=0.5
        )
        ax.plot(
            xs,
            ys,
            ls=ls,
            lw=1,
            color=color,
            marker=marker,
            ms=3,
            alpha=0.8,
            label=f"{name} (ECE {100 * row['ece']:.1f}%)",
        )
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, alpha=0.5, label="perfect calibration")


def ensembles_figure(results: dict[str, list[dict]], *, title: str = "") -> Figure:
    """The figure of :func:`plot_ensembles`, for saving elsewhere or showing in a notebook."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig = plt.figure(figsize=(16, 5.6), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[2.1, 1])
    left, right = fig.add_subfigure(grid[0]), fig.add_subfigure(grid[1])
    ax_acc, ax_nll = left.subplots(1, 2)
    ax_rel = right.subplots()

    refs: list[tuple[str, float, float, object, str]] = []  # name, acc %, nll, style, colour
    core_acc: list[float] = []
    core_nll: list[float] = []
    handles: list[Line2D] = []
    reliability: list[tuple[str, dict, str, str, str]] = []
    for i, (label, rows) in enumerate(results.items()):
        color, marker = _style(i)
        ens = sorted((r for r in rows if r["group"] == "ensemble"), key=lambda r: r["k"])
        if ens:
            ks = [r["k"] for r in ens]
            accs = [100 * r["accuracy"] for r in ens]
            nlls = [r["nll"] for r in ens]
            ax_acc.plot(ks, accs, color=color, marker=marker, lw=2, ms=6)
            ax_nll.plot(ks, nlls, color=color, marker=marker, lw=2, ms=6)
            core_acc += _finite(accs)
            core_nll += _finite(nlls)
            handles.append(
                Line2D([], [], color=color, marker=marker, lw=2, ms=6, label=f"{label} ensemble")
            )
        for r in rows:
            if r["group"] == "ensemble":
                continue
            if r["label"] == "path midpoint":
                name, (ls, ref_color) = f"{label} midpoint", ("--", color)
            elif i == 0:  # endpoints, pair, straight midpoint: once, from the first artifact
                name = r["label"]
                ls, ref_color = _REFERENCES.get(name, ((0, (1, 3)), color))
                if r["group"] in ("endpoint", "pair"):
                    core_acc += _finite([100 * r["accuracy"]])
                    core_nll += _finite([r["nll"]])
            else:
                continue
            same = [
                j
                for j, ref in enumerate(refs)
                if (ref[1], ref[2]) == (100 * r["accuracy"], r["nll"])
            ]
            if same:  # e.g. the straight line's own midpoint is the straight midpoint
                j = same[0]
                refs[j] = (f"{refs[j][0]} = {name}", *refs[j][1:])
                continue
            refs.append((name, 100 * r["accuracy"], r["nll"], ls, ref_color))
        # Reliability of this artifact's largest ensemble, and of endpoint A for the first one.
        if i == 0:
            reliability += [
                ("endpoint A", r, "dimgray", "s", ":") for r in rows if r["label"] == "endpoint A"
            ]
        reliability += [(f"{label} K={r['k']}", r, color, marker, "-") for r in ens[-1:]]

    off_acc = _reference_lines(
        ax_acc, [(n, a, ls, c) for n, a, _, ls, c in refs], core_acc, 0.5, lambda v: f"{v:.1f}%"
    )
    off_nll = _reference_lines(
        ax_nll, [(n, v, ls, c) for n, _, v, ls, c in refs], core_nll, 0.01, lambda v: f"{v:.3f}"
    )
    for name, _, _, ls, color in refs:
        notes = []
        if name in off_acc:
            notes.append("acc" + off_acc[name])
        if name in off_nll:
            notes.append("NLL" + off_nll[name])
        suffix = ("\n  " + "; ".join(notes)) if notes else ""
        handles.append(Line2D([], [], ls=ls, color=color, lw=1.2, label=name + suffix))

    ax_acc.set(xlabel="ensemble size K", ylabel="test accuracy (%)", title="accuracy against K")
    ax_nll.set(xlabel="ensemble size K", ylabel="test NLL", title="NLL against K")
    ks = sorted({r["k"] for rows in results.values() for r in rows if r["group"] == "ensemble"})
    for ax in (ax_acc, ax_nll):
        ax.grid(alpha=0.3)
        if ks:
            ax.set_xticks(ks)
    if handles:
        left.legend(
            handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=8
        )

    _reliability(ax_rel, reliability)
    ax_rel.set(
        xlabel="confidence",
        ylabel="accuracy",
        title="reliability (15 bins; marker area ~ count)",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax_rel.grid(alpha=0.3)
    if ax_rel.get_legend_handles_labels()[0]:
        right.legend(loc="outside lower center", fontsize=8, ncol=1)
    if title:
        fig.suptitle(title)
    return fig


def plot_ensembles(
    results: dict[str, list[dict]], out: str | os.PathLike, *, title: str = ""
) -> None:
    """Accuracy and NLL against ensemble size K, and a reliability diagram.

    ``results`` maps an artifact's label to its rows (``Row.to_json()``). Ensembles are lines
    over K; endpoints and midpoints are horizontal references (first artifact only, to keep the
    picture readable when several paths share endpoints). The axes hold the ensembles, the
    endpoints and their pair; a midpoint far off them (the unaligned straight line's) is marked
    on the edge and its value given in the legend. Legends sit below the panels.
    """
    _save(ensembles_figure(results, title=title), out)


def cascade_figure(results: dict[str, dict], *, title: str = "") -> Figure:
    """The figure of :func:`plot_cascade`, for saving elsewhere or showing in a notebook."""
    plt = _pyplot()

    fig, (ax_acc, ax_nll) = plt.subplots(1, 2, figsize=(13, 5.6), layout="constrained")
    for i, (label, sweep) in enumerate(results.items()):
        color, marker = _style(i)
        for points, name, style in (
            (sweep.get("cascade", []), f"{label} cascade ({sweep.get('rule', '')})", "-"),
            (
                sweep.get("plain", []),
                f"{label} plain K=1..{sweep.get('k', '')} (cascade order)",
                "--",
            ),
        ):
            points = sorted(points, key=lambda p: p["cost"])
            costs = [p["cost"] for p in points]
            filled = style == "-"
            common = {
                "color": color,
                "marker": marker,
                "ls": style,
                "lw": 2 if filled else 1.2,
                "ms": 6,
                "mfc": color if filled else "white",
            }
            _line(ax_acc, costs, [100 * p["accuracy"] for p in points], label=name, **common)
            _line(ax_nll, costs, [p["nll"] for p in points], **common)
        s = sweep.get("suggestion")
        chosen = [p for p in sweep.get("cascade", []) if s and p["threshold"] == s["threshold"]]
        if s and chosen:  # on this plot's data: the held-out figures are in the table and JSON
            for ax, value in ((ax_acc, 100 * chosen[0]["accuracy"]), (ax_nll, chosen[0]["nll"])):
                ax.plot(
                    [chosen[0]["cost"]],
                    [value],
                    marker="*",
                    ms=16,
                    color=color,
                    mec="black",
                    ls="none",
                    label=f"{label} suggested threshold {s['threshold']:g}"
                    if ax is ax_acc
                    else None,
                )
    ax_acc.set(
        xlabel="cost (members run per input)",
        ylabel="accuracy (%)",
        title="accuracy against cost",
    )
    ax_nll.set(xlabel="cost (members run per input)", ylabel="NLL", title="NLL against cost")
    for ax in (ax_acc, ax_nll):
        ax.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", ncol=3, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_cascade(results: dict[str, dict], out: str | os.PathLike, *, title: str = "") -> None:
    """Accuracy and NLL against cost for cascades and for plain ensembles of each K.

    ``results`` maps an artifact's label to its sweep (``CascadeSweep.to_json()``): the cascade
    over its thresholds is a solid line, the plain ensembles of the first 1..K members (in
    cascade order, cost K) a dashed one on the same axes; a star marks the suggested threshold
    (its point on the same data; the held-out figures are in the sweep's ``suggestion``).
    """
    _save(cascade_figure(results, title=title), out)
