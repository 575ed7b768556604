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
