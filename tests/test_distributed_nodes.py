"""NEB/AutoNEB pivots and geodesic nodes sharded across ranks: real ``torchrun`` processes on
the CPU (gloo) fit the same path as one process, bitwise, with the same statistics; a state
saved by two ranks resumes under one and the other way round; ``modeconn connect`` under
``torchrun`` writes the same artifact as one process.

The fits run in subprocesses of a small driver (written to a temporary folder): once in one
process for the reference (and one interrupted fit per method, saving its state), once under
``torchrun --nproc-per-node 2`` (the same fits, interrupted ones saving states, and resumes of
the one-process states), and once more in one process to resume the two-rank states. Every
process has one thread: bitwise equality holds for the same threads per process.

Equality is bitwise for every case, the fused Adam kernel's included (``neb_fused_adam``: the
sharded optimiser lays its tensor out as one process's, see ``modeconn.fit.neb._Optimiser``).
A resumed NEB cycle evaluates its endpoints' losses again, so ``loss_evaluations`` of a resumed
fit counts two more per resumed cycle, as it does in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modeconn import distributed
from modeconn.fit.sharding import Shard, halo_wants

ROOT = Path(__file__).resolve().parents[1]
#: Seconds a launch may take before it counts as hung (they take ~10-30 s on two CPU cores).
TIMEOUT = 240
#: Fits between two digits MLPs (64-16-16-10 from seeds 0 and 1, but for "neb_fused_adam")
#: and on the seed's ring.
MODEL_CASES = {
    "neb": ("neb", {"nodes": 6, "steps": 24}),
    "autoneb": (
        "autoneb",
        {
            "cycles": [
                {"steps": 8, "lr": 3e-3, "insert": "equal", "insert_count": 2},
                {"steps": 8, "lr": 1e-3, "repeat": 2},
            ],
            "insert_threshold": 0.0,  # every cycle inserts: the blocks change each time
            "engine": "vmap",
        },
    ),
    "geodesic": (
        "geodesic",
        {"nodes": 7, "steps": 24, "batch_size": 64, "optimizer": "adam", "lr": 1e-3},
    ),
    # one interior node: rank 1 owns none and sits the exchanges out
    "geodesic_idle_rank": ("geodesic", {"nodes": 3, "steps": 12, "batch_size": 64}),
    # 9 pivots of 64-64-64-10 MLPs (8,970 numbers each): fused Adam, and rank 0's block ends
    # mid-vector; without the aligned layout the chains part after a few steps
    "neb_fused_adam": ("neb", {"nodes": 11, "steps": 40}),
}
#: Width of each case's MLPs (default 16).
WIDTHS = {"neb_fused_adam": 64}
ENERGY_CASES = {
    "ring_neb": ("neb", {"nodes": 7, "steps": 60, "engine": "loop"}),
    # the first cycle inserts one pivot, so rank 1 owns none until the second cycle
    "ring_autoneb": (
        "autoneb",
        {
            "cycles": [
                {"steps": 30, "lr": 0.01, "insert": "equal", "insert_count": 1},
                {"steps": 30, "lr": 0.003, "repeat": 2},
            ],
            "insert_threshold": 0.0,
        },
    ),
}
#: The methods whose interrupted two-rank fits resume (their model cases).
RESUMED = ("neb", "autoneb", "geodesic")

DRIVER = textwrap.dedent(
    '''
    """Fits under the process group torchrun describes (or in one process) for
    tests/test_distributed_nodes.py; rank 0 writes what they returned."""

    import dataclasses
    import json
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from modeconn import distributed
    from modeconn.data import load_data
    from modeconn.fit.connect import connect
    from modeconn.models import create_model

    MODEL_CASES = json.loads(sys.argv[3])
    ENERGY_CASES = json.loads(sys.argv[4])
    RESUMED = json.loads(sys.argv[5])
    WIDTHS = json.loads(sys.argv[6])
    KILL_AT = 17  # the batch at which an interrupted fit stops (states saved every 5 steps)


    class Killed(Exception):
        pass


    def ring(w):
        return (w.pow(2).sum() - 1) ** 2


    def record(out, stats_out, name, path, stats):
        for key, value in path.nodes.items():
            out[f"{name}/nodes/{key}"] = value.detach().cpu().contiguous()
        out[f"{name}/knots"] = path.knots().cpu().contiguous()
        stats_out[name] = {k: v for k, v in stats.items() if k not in ("seconds", "seconds_per_step")}


    def respace_bunched(sharded):
        """An L-shaped chain with its pivots bunched near A, re-spaced evenly: most targets
        lie in segments far from their pivots (and, sharded, in other ranks' blocks)."""
        from modeconn.fit.neb import Band, respace

        gen = torch.Generator().manual_seed(0)
        corner = torch.tensor([[0.0, 0.0], [0.05, 0.0], [0.1, 0.0], [0.15, 0.0], [0.2, 0.0],
                               [0.25, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
        chain = torch.cat([corner, torch.randn(8, 3, generator=gen, dtype=torch.float64)], 1)
        weights = torch.arange(1, 8, dtype=torch.float64)  # uneven target shares
        if not sharded:
            return respace(chain, weights)
        band = Band.take(chain, chain[[0, -1]])
        band.respace(weights)
        return band.gather()


    def main():
        out_dir, mode = Path(sys.argv[1]), sys.argv[2]
        distributed.setup("cpu")
        torch.set_num_threads(1)
        data = load_data("digits")

        def fit(case, data=data, **kwargs):
            method, options = MODEL_CASES[case]
            models = []
            for seed in (0, 1):
                torch.manual_seed(seed)
                models.append(create_model("mlp", data.input_shape, data.num_classes,
                                           width=WIDTHS.get(case, 16), depth=2))
            a, b = (m.state_dict() for m in models)
            return connect(models[0], a, b, method, data=data, **options, **kwargs)

        def interrupted(case, state):
            calls = {"n": 0}

            def dies(x, generator):
                calls["n"] += 1  # every rank draws the same batches, so all stop together
                if calls["n"] == KILL_AT:
                    raise Killed
                return x

            try:
                fit(case, data=dataclasses.replace(data, augment=dies), checkpoint=state,
                    checkpoint_every=5)
            except Killed:
                return
            raise AssertionError(f"{case} was not interrupted")

        tensors, stats = {}, {}
        if mode in ("reference", "sharded"):
            respaced = respace_bunched(sharded=mode == "sharded")
            tensors["respace/nodes/w"] = respaced
            stats["respace"] = {}
            for case in MODEL_CASES:
                run_stats = {}
                record(tensors, stats, case, fit(case, stats=run_stats), run_stats)
            for case, (method, options) in ENERGY_CASES.items():
                run_stats = {}
                w_a = torch.tensor([1.0, 0.0], dtype=torch.float64)
                w_b = torch.tensor([-1.0, 0.0], dtype=torch.float64)
                path = connect(ring, w_a, w_b, method, stats=run_stats, **options)
                record(tensors, stats, case, path, run_stats)
            for case in RESUMED:
                interrupted(case, out_dir / f"{mode}-{case}.state")
        resumes = {"sharded": "reference", "resume": "sharded"}
        if mode in resumes:
            for case in RESUMED:
                run_stats = {}
                state = out_dir / f"{resumes[mode]}-{case}.state"
                path = fit(case, checkpoint=state, resume=True, checkpoint_every=5,
                           stats=run_stats)
                record(tensors, stats, f"resumed/{case}", path, run_stats)
        if distributed.is_main():
            save_file(tensors, str(out_dir / f"{mode}.safetensors"),
                      metadata={"stats": json.dumps(stats, sort_keys=True)})
        distributed.teardown()


    if __name__ == "__main__":
        main()
    '''
)


def _launch(tmp: Path, mode: str, ranks: int) -> None:
    """Run the driver in ``mode`` with ``ranks`` processes; every one must exit cleanly."""
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    cases = [MODEL_CASES, ENERGY_CASES, RESUMED, WIDTHS]
    args = [str(tmp), mode, *map(json.dumps, cases)]
    if ranks == 1:
        command = [sys.executable, str(script), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ranks}", str(script), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the one-process runs must not think they have peers
    done = subprocess.run(
        command, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    tail = f"\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{mode} with {ranks} ranks exited {done.returncode}{tail}"
    for bad in ("Traceback", "ChildFailedError", "Aborted", "core dumped"):
        assert bad not in done.stderr, f"{mode} with {ranks} ranks: {bad!r} in stderr{tail}"


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        stats = json.loads(handle.metadata()["stats"])
    return tensors, stats


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """Reference (1 process), sharded (2 ranks) and resumed (1 process) results."""
    tmp = tmp_path_factory.mktemp("sharded")
    _launch(tmp, "reference", 1)
    _launch(tmp, "sharded", 2)
    _launch(tmp, "resume", 1)
    return {mode: _load(tmp / f"{mode}.safetensors") for mode in ("reference", "sharded", "resume")}


def _assert_same_fit(
    got, want, name: str, want_name: str | None = None, *, redone: tuple[str, ...] = ()
) -> None:
    """The same path, bitwise, and the same statistics (but for the counts in ``redone``)."""
    (tensors, stats), (ref_tensors, ref_stats) = got, want
    want_name = want_name or name
    keys = sorted(k[len(want_name) :] for k in ref_tensors if k.startswith(f"{want_name}/"))
    assert keys, f"no reference for {want_name}"
    for key in keys:
        mine, ref = tensors[name + key], ref_tensors[want_name + key]
        diff = float((mine - ref).abs().max()) if mine.shape == ref.shape else float("nan")
        assert torch.equal(mine, ref), f"{name}{key} differs (max abs diff {diff:.3g})"
    drop = set(redone)
    assert {k: v for k, v in stats[name].items() if k not in drop} == {
        k: v for k, v in ref_stats[want_name].items() if k not in drop
    }


@pytest.mark.parametrize("case", [*MODEL_CASES, *ENERGY_CASES, "respace"])
def test_two_ranks_fit_the_one_process_path_bitwise(runs, case):
    _assert_same_fit(runs["sharded"], runs["reference"], case)


#: A resumed NEB cycle evaluates its endpoints' losses again (in one process too).
REDONE = ("loss_evaluations",)


@pytest.mark.parametrize("method", RESUMED)
def test_a_two_rank_state_resumes_in_one_process(runs, method):
    _assert_same_fit(runs["resume"], runs["reference"], f"resumed/{method}", method, redone=REDONE)


@pytest.mark.parametrize("method", RESUMED)
def test_a_one_process_state_resumes_under_two_ranks(runs, method):
    _assert_same_fit(runs["sharded"], runs["reference"], f"resumed/{method}", method, redone=REDONE)


# ---------------------------------------------------------------------------------------------
# The command line: ``torchrun ... -m modeconn connect --method neb``


def _run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_the_cli_fits_the_same_neb_artifact_on_two_ranks(tmp_path):
    from modeconn.checkpoint import save_checkpoint
    from modeconn.data import load_data
    from modeconn.models import create_model

    data = load_data("digits")
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        model = create_model("mlp", data.input_shape, data.num_classes, width=16, depth=2)
        save_checkpoint(tmp_path / f"{name}.safetensors", model, data="digits", seed=seed)
    argv = ["-m", "modeconn", "--quiet", "connect", "a.safetensors", "b.safetensors",
            "--method", "neb", "--nodes", "6", "--steps", "20", "--eval-points", "0"]  # fmt: skip
    _run([sys.executable, *argv, "--out", "one"], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    _run([*torchrun, *argv, "--out", "two"], tmp_path)
    one, two = (load_file(str(tmp_path / d / "nodes.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two")]
    assert manifests[0]["knots"] == manifests[1]["knots"]
    stats = [{k: v for k, v in m["fit"]["stats"].items() if k != "seconds"} for m in manifests]
    assert stats[0] == stats[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors",
                                                          "one", "two"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The plan of who owns and who wants which rows (no processes needed)


def test_blocks_cover_the_interior_once_and_bands_see_their_neighbours():
    for size in range(2, 12):
        for world in range(1, 5):
            shards = [Shard(size, rank, world) for rank in range(world)]
            owned = [row for s in shards for row in range(s.lo, s.hi)]
            assert owned == list(range(1, size - 1))
            edges = [s.rank for s in shards if s.edge_segment()]
            assert len(edges) == 1  # exactly one rank accounts for the segment into B
            wants = halo_wants(shards[0])
            for s in shards:
                assert all(s.owner(row) not in (None, s.rank) for row in wants[s.rank])
                assert {s.lo - 1, s.hi} - {0, size - 1} == set(wants[s.rank])
            assert distributed.blocks(size - 2, world) == [(lo - 1, hi - 1) for lo, hi in
                                                           shards[0].bounds]  # fmt: skip


def test_a_block_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="interior rows"):
        Shard(6, 0, 2).take(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least its two endpoints"):
        Shard(1)
