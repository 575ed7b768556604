"""Figures: valid PNGs for typical and awkward inputs, legends off the data, axes on what matters."""

from __future__ import annotations

import math

import matplotlib
import matplotlib.image
import pytest

from modeconn.plots import ensembles_figure, paths_figure, plot_ensembles, plot_paths

matplotlib.use("Agg")

PNG = b"\x89PNG\r\n\x1a\n"


def _evaluation(peak_loss: float, peak_err: float, points: int = 41) -> dict:
    """A path evaluation as JSON: a bump of ``peak_loss`` and ``peak_err`` in the middle."""
    ts = [i / (points - 1) for i in range(points)]
    bump = [math.sin(math.pi * t) ** 2 for t in ts]
    return {
        "ts": ts,
        "train_loss": [0.01 + peak_loss * b for b in bump],
        "test_loss": [0.15 + peak_loss * b for b in bump],
        "train_acc": [1.0 - peak_err * b for b in bump],
        "test_acc": [0.96 - peak_err * b for b in bump],
    }


def _row(label: str, group: str, k: int, acc: float, nll: float) -> dict:
    """A report row as JSON (``Row.to_json()``), with a reliability table of 15 bins."""
    count = [0.0] * 10 + [2.0, 3.0, 5.0, 10.0, 340.0]
    return {
        "label": label,
        "group": group,
        "k": k,
        "ts": [0.5] * k,
        "accuracy": acc,
        "nll": nll,
        "brier": 0.06,
        "ece": 0.03,
        "disagreement": 0.0,
        "reliability": {
            "confidence": [(b + 0.5) / 15 for b in range(15)],
            "accuracy": [min(1.0, (b + 1) / 15) for b in range(15)],
            "count": count,
        },
    }


def _rows(midpoint_acc: float = 0.94, midpoint_nll: float = 0.24, ks=(2, 4, 8)) -> list[dict]:
    rows = [
        _row("endpoint A", "endpoint", 1, 0.958, 0.160),
        _row("endpoint B", "endpoint", 1, 0.961, 0.171),
        _row("A+B ensemble", "pair", 2, 0.956, 0.151),
        _row("straight midpoint", "midpoint", 1, midpoint_acc, midpoint_nll),
        _row("path midpoint", "midpoint", 1, 0.953, 0.174),
    ]
    return rows + [_row(f"path ensemble K={k}", "ensemble", k, 0.95 + k / 1000, 0.15) for k in ks]


def _legends_clear_of_axes(fig) -> None:
    """Every legend's window extent is disjoint from every axes' extent."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [leg for sub in fig.subfigs for leg in sub.legends]
    legends += [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends, "the figure has no legend"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (
                f"legend {[t.get_text() for t in legend.get_texts()]} overlaps {ax.get_title()!r}"
            )


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600


# -- paths -----------------------------------------------------------------------------------

PATHS = {
    "typical": {
        "linear-unaligned": _evaluation(1.6, 0.40),  # the huge straight-line error
        "linear": _evaluation(0.08, 0.03),
        "bezier": _evaluation(0.014, 0.01),
        "neb": _evaluation(0.0, 0.0),
    },
    "one method": {"bezier": _evaluation(0.014, 0.01)},
    "with NaNs": {
        "bezier": _evaluation(0.014, 0.01),
        "diverged": {
            **_evaluation(0.5, 0.1),
            "train_loss": [0.01, math.nan, math.inf] + [math.nan] * 38,
            "test_acc": [0.96] + [math.nan] * 40,
        },
    },
    "zero loss": {"flat": {**_evaluation(0.0, 0.0), "train_loss": [0.0] * 41}},
    "many methods": {f"method {i}": _evaluation(0.01 * i, 0.002 * i) for i in range(12)},
}


@pytest.mark.parametrize("case", list(PATHS))
def test_plot_paths_writes_a_png_with_its_legend_outside_the_axes(case, tmp_path):
    plot_paths(PATHS[case], tmp_path / "p.png", title=case)
    _assert_png(tmp_path / "p.png")
    fig = paths_figure(PATHS[case], title=case)
    _legends_clear_of_axes(fig)


def test_error_panel_zooms_on_the_low_paths_and_marks_the_straight_line():
    fig = paths_figure(PATHS["typical"])
    ax_loss, ax_err = fig.axes
    bottom, top = ax_err.get_ylim()
    # every low path fits (linear peaks at 4 + 3 = 7 %), the 44 % straight line does not
    assert 7.0 < top < 15.0 and bottom <= 0.0
    assert "linear-unaligned" in ax_err.get_title() and "44.0%" in ax_err.get_title()
    assert ax_loss.get_yscale() == "log"
    # each path has its own colour and marker
    lines = ax_loss.get_lines()
    styles = {(line.get_color(), line.get_marker()) for line in lines}
    assert len(styles) == len(PATHS["typical"])
    # the legend lists the paths by their loss barrier above the chord, lowest first
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [t.split()[0] for t in texts[:4]] == ["neb", "bezier", "linear", "linear-unaligned"]


def test_error_panel_keeps_every_path_when_none_is_far_off():
    fig = paths_figure({"bezier": _evaluation(0.01, 0.01), "neb": _evaluation(0.0, 0.02)})
    ax_err = fig.axes[1]
    assert ax_err.get_ylim()[1] >= 100 * (1 - 0.96 + 0.02)
    assert "off scale" not in ax_err.get_title()


# -- ensembles -------------------------------------------------------------------------------

ENSEMBLES = {
    "typical": {"bezier": _rows(), "neb": _rows(), "fge": _rows()[5:]},
    "one artifact": {"bezier": _rows()},
    "far straight midpoint": {"linear-unaligned": _rows(0.60, 1.65)},
    "with NaNs": {
        "bezier": _rows(math.nan, math.nan) + [_row("x K=3", "ensemble", 3, math.nan, 0.2)]
    },
    "no ensembles": {"bezier": _rows(ks=())},
    "one K": {"bezier": _rows(ks=(4,))},
}


@pytest.mark.parametrize("case", list(ENSEMBLES))
def test_plot_ensembles_writes_a_png_with_its_legends_outside_the_axes(case, tmp_path):
    plot_ensembles(ENSEMBLES[case], tmp_path / "e.png", title=case)
    _assert_png(tmp_path / "e.png")
    _legends_clear_of_axes(ensembles_figure(ENSEMBLES[case], title=case))


def test_a_far_straight_midpoint_does_not_stretch_the_axes():
    fig = ensembles_figure(ENSEMBLES["far straight midpoint"])
    ax_acc, ax_nll = fig.axes[:2]
    lo, hi = ax_acc.get_ylim()
    assert lo > 90.0 and hi < 100.0  # the ensembles and endpoints (95-96 %), not the 60 %
    assert ax_nll.get_ylim()[1] < 0.5  # not the midpoint's 1.65
    labels = [t.get_text() for sub in fig.subfigs for leg in sub.legends for t in leg.get_texts()]
    note = next(text for text in labels if text.startswith("straight midpoint"))
    assert "60.0%" in note and "1.650" in note and "off scale" in note
