"""The benchmark suite still runs (quick mode). Nothing here times anything: speed is measured
by ``make bench`` and reported in benchmarks/RESULTS.md, never asserted in tests."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted(p.stem for p in (Path(__file__).parents[1] / "benchmarks").glob("bench_*.py"))


def test_every_target_names_a_benchmark():
    from benchmarks.run import TARGETS

    names = {name[len("bench_") :] for name in BENCHMARKS}
    assert {bench for bench, *_ in TARGETS} <= names


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_in_quick_mode(name):
    from benchmarks.run import TARGETS, _lookup

    result = importlib.import_module(f"benchmarks.{name}").run(quick=True, device="cpu")
    assert isinstance(result, dict) and result
    keys = [key for bench, key, *_ in TARGETS if f"bench_{bench}" == name]
    if keys:  # quick mode may skip the heavier cases, but measures at least one target
        measured = [k for k in keys if isinstance(_lookup(result, k), int | float)]
        assert measured, f"{name} measured none of its targets {keys}"


def test_results_of_benchmarks_not_rerun_stay_in_the_report(tmp_path):
    from benchmarks.run import _load, _report, _save

    store = tmp_path / "results.json"
    _save(store, {"align": {"result": {"mlp_64-256-256-10": {"ratio": 0.5}}, "seconds": 3}})
    stored = _load(store)
    stored.update({"neb": {"result": {"worst_ratio_auto": 1.5}, "seconds": 4, "when": "today"}})
    report = _report(stored, {"cpu": "test"})
    assert "## align" in report and "## neb" in report
    assert (
        "| align | weight matching / plain reference, MLP-256 trained on digits | 0.5 |" in report
    )
    assert (
        "| neb | NEB step over N pivots / N plain steps (worst case) | 1.5 | <= 1.0 | **missed** |"
        in report
    )
    assert _load(tmp_path / "missing.json") == {}
