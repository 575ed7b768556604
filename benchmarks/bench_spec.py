"""Benchmark permutation specs inferred from the graph (``models.infer.infer_spec``).

* **Weight matching on a big network**: two torchvision ResNet-50 (25.6 M parameters, random
  init with seeds 0 and 1: the cost depends on shapes, not on training) aligned with the
  inferred spec. Wall time (target <= 20 s) and peak extra memory as a multiple of one state
  dict (target <= 3x), measured in a fresh process: RSS sampled every millisecond during
  matching, minus the RSS once both state dicts are loaded; medians over 3 such processes.
  Also the time ``infer_spec`` takes.
* **Registry models, alignment unchanged**: for ``mlp``, ``cnn`` and ``resnet20`` (random
  endpoints, seeds 0 and 1) the inferred groups are renamed onto the hand-written reference
  specs (``tests/reference_specs.py``) by the (key, axis, segment) each covers, and weight
  matching with either spec must give identical permutations.
* **Coverage**: the share of torchvision's 80 builders whose inferred spec passes the
  permutation check (target >= 90 %), from :mod:`benchmarks.spec_coverage`; the per-builder
  table goes to ``benchmarks/SPEC_COVERAGE.md``.

Quick mode: ResNet-18 instead of ResNet-50, and the coverage of the smallest builder of the
four families with the smallest models (nothing written).

    python -m benchmarks.bench_spec [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import spec_coverage  # noqa: E402
from modeconn.matching import weight_matching  # noqa: E402
from modeconn.models import create_model  # noqa: E402
from modeconn.models.infer import infer_spec  # noqa: E402
from modeconn.models.spec import PermutationSpec, axis_segments, rename_groups  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# name -> (registered model, input shape, kwargs)
REGISTRY_CASES = {
    "mlp": ("mlp", (1, 8, 8), {"depth": 2, "width": 256}),
    "cnn": ("cnn", (3, 32, 32), {"channels": (32, 64), "norm": "bn"}),
    "resnet20": ("resnet20", (3, 32, 32), {"width": 4, "norm": "bn"}),
}
QUICK_FAMILIES = 4


# ---------------------------------------------------------------------------------------------
# Weight matching on a torchvision ResNet, in a fresh process


def _torchvision_state(name: str, seed: int) -> tuple[torch.nn.Module, dict]:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=1000).eval()
    return model, model.state_dict()


class _PeakRSS:
    """Samples this process's resident set size in a thread: the largest value seen."""

    def __init__(self, interval: float = 0.001):
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _matching_worker(name: str, device: str) -> dict:
    """Runs in its own process: load two state dicts, then weight-match them once."""
    import resource

    import psutil

    model, state_a = _torchvision_state(name, 0)
    spec = infer_spec(model, torch.zeros(2, 3, 64, 64)).spec  # the spec is the same at any size
    _, state_b = _torchvision_state(name, 1)
    del model
    gc.collect()
    state_bytes = sum(v.numel() * v.element_size() for v in state_a.values())
    baseline = psutil.Process().memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with _PeakRSS() as rss:
        result = weight_matching(spec, state_a, state_b, device=device)
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss only rises past the earlier peak (model building) when matching goes higher.
    peak = max(rss.peak, maxrss_after if maxrss_after > maxrss_before else 0)
    mib = 2**20
    return {
        "parameters": sum(v.numel() for v in state_a.values() if v.is_floating_point()),
        "groups": len(result.perms),
        "match_seconds": result.seconds,
        "sweeps": result.sweeps,
        "converged": result.converged,
        "lsa_share": result.lsa_seconds / result.seconds,
        "objective_gain": result.objective[-1] / result.objective[0],
        "state_mib": state_bytes / mib,
        "baseline_rss_mib": baseline / mib,
        "peak_rss_mib": peak / mib,
        "peak_extra_mib": (peak - baseline) / mib,
        "peak_extra_over_state": (peak - baseline) / state_bytes,
    }


def _matching_once(name: str, device: str) -> dict:
    """:func:`_matching_worker` in a fresh interpreter, so that its memory baseline is clean."""
    command = [sys.executable, "-m", "benchmarks.bench_spec", "--match-worker", name]
    command += ["--device", device]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(
            f"weight matching of {name} failed (exit code {done.returncode}):\n"
            + done.stderr[-3000:]
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _matching(name: str, device: str, repeats: int) -> dict:
    """Medians over ``repeats`` fresh processes (this machine is shared), plus the extremes."""
    runs = [_matching_once(name, device) for _ in range(repeats)]
    result = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "converged"}
    result.update(
        converged=all(r["converged"] for r in runs),
        repeats=repeats,
        match_seconds_min=min(r["match_seconds"] for r in runs),
        peak_extra_over_state_max=max(r["peak_extra_over_state"] for r in runs),
    )
    return result


def _inference_seconds(name: str, repeats: int) -> dict:
    """Time ``infer_spec`` on a torchvision model at its ImageNet input size (batch 2)."""
    model, state = _torchvision_state(name, 0)
    x = torch.zeros(2, 3, 224, 224)  # (2, 3, 224, 224)
    seconds, inferred = [], None
    for _ in range(repeats):
        tic = time.perf_counter()
        inferred = infer_spec(model, x)
        seconds.append(time.perf_counter() - tic)
    return {
        "infer_seconds": statistics.median(seconds),
        "infer_repeats": repeats,
        "tracer": inferred.tracer,
        "inferred_groups": len(inferred.groups),
        "left_unpermuted": len(inferred.frozen),
        "unused_keys": len(inferred.unused),
    }


# ---------------------------------------------------------------------------------------------
# Registry models: hand-written vs inferred spec


def _reference_spec(model: torch.nn.Module) -> tuple[PermutationSpec, str]:
    """The hand-written spec: the model's own method if it has one, else the test reference."""
    if hasattr(model, "permutation_spec"):
        return model.permutation_spec(), "model.permutation_spec()"
    from tests.reference_specs import reference_spec

    return reference_spec(model), "tests/reference_specs.py"


def _coverage_signatures(spec: PermutationSpec, state: dict) -> dict[str, frozenset]:
    """Each group -> the set of ``(key, axis, offset, count, inner)`` segments it permutes."""
    covered: dict[str, set] = {}
    for key, axes in spec.items():
        for axis, entry in enumerate(axes):
            offset = 0
            for group, count, inner in axis_segments(entry, int(state[key].shape[axis])):
                if group is not None:
                    covered.setdefault(group, set()).add((key, axis, offset, count, inner))
                offset += count * inner
    return {g: frozenset(s) for g, s in covered.items()}


def _rename_onto(inferred: PermutationSpec, reference: PermutationSpec, state: dict) -> dict:
    """The bijection inferred group -> reference group with identical coverage, if there is one."""
    by_signature = {s: g for g, s in _coverage_signatures(reference, state).items()}
    names = {}
    for group, signature in _coverage_signatures(inferred, state).items():
        if signature in by_signature:
            names[group] = by_signature[signature]
    return names


def _registry_case(name: str, shape, kwargs: dict, device: str) -> dict:
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(name, shape, 10, **kwargs)
        states.append(model.state_dict())
    reference, source = _reference_spec(model)
    inferred = infer_spec(model, torch.zeros(2, *shape)).spec
    names = _rename_onto(inferred, reference, states[0])
    n_ref = len(_coverage_signatures(reference, states[0]))
    n_inf = len(_coverage_signatures(inferred, states[0]))
    bijection = len(names) == n_inf == n_ref and len(set(names.values())) == n_ref
    renamed = rename_groups(inferred, names)
    hand = weight_matching(reference, *states, device=device)
    auto = weight_matching(renamed, *states, device=device)
    same = bijection and all(
        g in auto.perms and torch.equal(p.cpu(), auto.perms[g].cpu()) for g, p in hand.perms.items()
    )
    return {
        "reference": source,
        "groups_hand": n_ref,
        "groups_inferred": n_inf,
        "bijection": bijection,
        "sweeps": hand.sweeps,
        "identical_permutations": "yes" if same else "no",
        "identical": same,
    }


# ---------------------------------------------------------------------------------------------


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Weight matching with an inferred spec (time, memory), registry parity, coverage."""
    import logging

    logging.getLogger("models").setLevel(logging.ERROR)
    logging.getLogger("modeconn").setLevel(logging.WARNING)
    big = "resnet18" if quick else "resnet50"
    results: dict = {"device": device, "torch_threads": torch.get_num_threads()}
    results[big] = {
        **_matching(big, device, 1 if quick else 3),
        **_inference_seconds(big, 1 if quick else 3),
    }
    registry = {case: _registry_case(*spec, device) for case, spec in REGISTRY_CASES.items()}
    results["registry"] = {
        case: {k: v for k, v in r.items() if k != "identical"} for case, r in registry.items()
    }
    identical = sum(r["identical"] for r in registry.values())
    results["registry_identical_share"] = identical / len(registry)

    if quick:
        smallest = spec_coverage.smallest_per_family()
        params = {n: spec_coverage.reference_params(n) for n in smallest}
        names = sorted(smallest, key=params.get)[:QUICK_FAMILIES]
    else:
        names = list(spec_coverage.builders())
    rows = spec_coverage.coverage(names)
    summary = spec_coverage.summarise(rows)
    families = summary.pop("families")
    results["coverage"] = {
        "builders_run": ", ".join(names) if quick else f"all {len(names)}",
        **{k: summary[k] for k in ("builders", "handled", "refused", "failed", "handled_percent")},
        "seconds": summary["seconds"],
    }
    results["coverage_by_family"] = families
    notes = [
        f"{big}: two random inits (seeds 0, 1), inferred spec; memory is RSS in a fresh process, "
        "peak during weight matching minus the RSS with both state dicts loaded, over one "
        "state dict's bytes; medians over fresh processes (min time, max memory alongside)",
        "registry: groups renamed by the (key, axis, segment) they cover; identical means every "
        "group's permutation is equal with the hand-written and the inferred spec",
    ]
    if not quick:
        table = spec_coverage.DEFAULT_OUT
        table.write_text(spec_coverage.render(rows, "python -m benchmarks.bench_spec"))
        notes.append(
            f"coverage: one row per builder, with the reasons, in "
            f"[{table.name}]({table.name}): handled and verified {summary['handled']}/"
            f"{summary['builders']} ({summary['handled_percent']:.0f} %)"
        )
    else:
        notes.append(f"coverage (quick): the smallest builder of {QUICK_FAMILIES} families")
    results["notes"] = notes
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 4 builders (~1 min)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--match-worker", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.match_worker:  # the fresh process of _matching: one JSON line on stdout
        print(json.dumps(_matching_worker(args.match_worker, args.device)))
        return
    results = run(quick=args.quick, device=args.device)
    print(json.dumps({k: v for k, v in results.items() if k != "coverage_by_family"}, indent=1))


if __name__ == "__main__":
    main()
