"""Run the benchmarks in ``benchmarks/`` and write ``benchmarks/RESULTS.md``.

Each ``bench_*.py`` module exposes ``run(quick: bool = False, device: str = "cpu") -> dict``.
Results are kept in ``benchmarks/results.json``, one entry per benchmark with when it was
measured, so ``--only NAME`` measures those again and RESULTS.md still shows the others.
Targets (the product's speed promises) are declared here, once, as paths into those dicts, so a
result that misses its target is reported as missed next to the number.

    python -m benchmarks.run [--quick] [--device cuda] [--only NAME ...] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Every benchmark's last full result, beside RESULTS.md: ``--only`` reruns some, keeps the rest.
RESULTS_JSON = "results.json"
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parent))

#: (benchmark, key path into its result, comparison, target, what it means)
TARGETS: list[tuple[str, str, str, float, str]] = [
    ("curves", "mlp_64-256-256-10/ratio_paired", "<=", 1.2, "curve (K=3) step / plain step, MLP"),
    (
        "curves",
        "resnet20_cifar/ratio_paired",
        "<=",
        1.2,
        "curve (K=3) step / plain step, ResNet-20",
    ),
    ("neb", "worst_ratio_auto", "<=", 1.0, "NEB step over N pivots / N plain steps (worst case)"),
    ("geodesic", "mlp_w256/ratio", "<=", 1.0, "geodesic step / N fwd+bwd, MLP-256"),
    ("geodesic", "mlp_w16/ratio", "<=", 1.0, "geodesic step / N fwd+bwd, MLP-16"),
    ("geodesic", "cnn_bn_8-16/ratio", "<=", 1.0, "geodesic step / N fwd+bwd, CNN with BN"),
    (
        "ensemble",
        "min_separate_over_fused_batch1",
        ">=",
        1.5,
        "K separate sessions / fused graph, batch 1 (worst K, model)",
    ),
    (
        "ensemble",
        "min_members_over_fused_batch256",
        ">=",
        0.95,
        "K x one member / fused graph, batch 256 (worst K, model)",
    ),
    (
        "int8",
        "min_int8_over_fp32_batch256",
        ">=",
        1.5,
        "int8 / fp32 fused K=8 ensemble images/s, batch 256 (worst model)",
    ),
    ("int8", "max_accuracy_drop_points", "<=", 0.2, "int8 accuracy drop, K=8 on digits (points)"),
    (
        "cascade",
        "summary/mlp16_digits/held-out cost",
        "<=",
        2.0,
        "cascade cost (members per input) at the chosen threshold, K=8, digits MLP",
    ),
    (
        "cascade",
        "summary/mlp16_digits/held-out accuracy gap (points)",
        "<=",
        0.1,
        "cascade accuracy below the full K=8 ensemble (points, held out), digits MLP",
    ),
    (
        "cascade",
        "summary/resnet20_digits/held-out cost",
        "<=",
        2.0,
        "cascade cost (members per input) at the chosen threshold, K=8, ResNet-20",
    ),
    (
        "cascade",
        "summary/resnet20_digits/held-out accuracy gap (points)",
        "<=",
        0.1,
        "cascade accuracy below the full K=8 ensemble (points, held out), ResNet-20",
    ),
    ("cli", "worst_help_seconds", "<=", 0.5, "slowest `modeconn ... --help`, fresh process (s)"),
    ("service", "summary/overhead_p50_ms_batch1", "<=", 5.0, "HTTP p50 overhead at batch 1 (ms)"),
    (
        "service",
        "summary/throughput_ratio_16_batch1",
        ">=",
        0.5,
        "HTTP / in-process throughput, 16 clients, batch 1 (MLP)",
    ),
    (
        "service",
        "summary/cnn_b64_throughput_ratio_16_batch64",
        ">=",
        0.5,
        "HTTP / in-process throughput, 16 clients, batch 64 (CNN, base64)",
    ),
    ("service", "summary/memory_ratio", "<=", 1.2, "serving memory / (K x weights + runtime)"),
    (
        "align",
        "mlp_64-256-256-10/ratio",
        "<=",
        1.0,
        "weight matching / plain reference, MLP-256 trained on digits",
    ),
    (
        "align",
        "resnet20x4_cifar/ratio",
        "<=",
        1.0,
        "weight matching / plain reference, ResNet-20x4",
    ),
    ("spec", "resnet50/match_seconds", "<=", 20.0, "weight matching, ResNet-50, inferred spec (s)"),
    (
        "spec",
        "resnet50/peak_extra_over_state",
        "<=",
        3.0,
        "weight matching peak extra memory / one state dict, ResNet-50",
    ),
    (
        "spec",
        "registry_identical_share",
        ">=",
        1.0,
        "registry models with identical permutations, hand-written vs inferred spec (share)",
    ),
    (
        "spec",
        "coverage/handled_percent",
        ">=",
        90.0,
        "torchvision builders handled and verified (%, SPEC_COVERAGE.md)",
    ),
]

#: Why a target is missed on this CPU, from the profiles taken when it was (meaning -> reason).
WHY_MISSED: dict[str, str] = {
    "NEB step over N pivots / N plain steps (worst case)": (
        "the worst case is the 64-256-256-10 MLP: its per-pivot gradients, batched with vmap, "
        "already cost as much as N plain steps (compute-bound matmuls); the tangent, projection, "
        "arc-length re-spacing and Adam update add 17-25 % of memory passes over all pivots. "
        "Small models (MLP-16: 0.46-0.87) and the BN CNN (0.95-0.98) meet the target."
    ),
    "geodesic step / N fwd+bwd, MLP-256": (
        "one geodesic step does the same N forward/backward passes as the N single-model steps (stacked with vmap), so on a compute-bound model about 1.0 is its floor; it lands on either side of 1.0 from run to run on this shared 2-core VM (an earlier run here: MLP-256 0.90, CNN 0.73). Where per-call overhead dominates (MLP-16) the step is 2x cheaper."
    ),
    "geodesic step / N fwd+bwd, CNN with BN": (
        "one geodesic step does the same N forward/backward passes as the N single-model steps (stacked with vmap), so on a compute-bound model about 1.0 is its floor; it lands on either side of 1.0 from run to run on this shared 2-core VM (an earlier run here: MLP-256 0.90, CNN 0.73). Where per-call overhead dominates (MLP-16) the step is 2x cheaper."
    ),
    "K separate sessions / fused graph, batch 1 (worst K, model)": (
        "the worst case is ResNet-20 at CIFAR shapes: one member costs ~0.39 ms of convolution "
        "against ~3.3 us of onnxruntime call overhead, so fusing has nothing to save on a CPU; "
        "parallel execution mode was 2-10x slower on 2 shared cores. The MLP meets it (1.69-1.78)."
    ),
    "K x one member / fused graph, batch 256 (worst K, model)": (
        "the worst case is the MLP at small K: a member takes ~0.2 ms, so the fused graph's "
        "uncertainty head (entropy, mutual information, disagreement: ~25 nodes) is a visible "
        "share; ResNet-20 meets it (0.95-1.00). The member mean was already turned into a matmul."
    ),
    "int8 accuracy drop, K=8 on digits (points)": (
        "digits has 360 test inputs, so one label flip is 0.28 points: the target can only be met "
        "at 0.00. The ResNet-20 ensemble flips one input, a near tie in fp32 (top two classes "
        "0.467 vs 0.466); 1024 calibration inputs, fp32 logit layers and QDQ flip the same one. "
        "Top-1 agreement 99.7 %, max |p_int8 - p_fp32| 0.016; the MLP loses 0.00 points."
    ),
    "cascade accuracy below the full K=8 ensemble (points, held out), digits MLP": (
        "the held-out half has 180 inputs, so one input is 0.56 points and the target can only be "
        "met at 0.00; over 20 seeded splits 14 meet it, at a mean gap of 0.17 points and a "
        "mean cost of 1.12 (see the splits in the cascade section). ResNet-20 meets it at a cost below 2."
    ),
    "curve (K=3) step / plain step, MLP": (
        "on 2026-12-02 the code of 2026-11-24 (which measured 1.18) measured 1.27 here, side by "
        "side with today's 1.28: the machine, not the curve step, moved. The MLP's step is ~1 ms, "
        "so the per-step overhead (the point w(t), the chain rule to the nodes) is a visible "
        "share; ResNet-20 meets it (1.07-1.09)."
    ),
    "serving memory / (K x weights + runtime)": (
        "on 2026-12-02 the service of 2026-11-24 (which measured 1.06) measured the same "
        "296 MB here as today's (bentoml 1.4.40 instead of 1.4.39): about 84 MB, one more copy "
        "of the five members' weights, stay in the worker after its graphs open. Not a change "
        "of the service; not explained yet."
    ),
    "HTTP / in-process throughput, 16 clients, batch 1 (MLP)": (
        "a digits-MLP ensemble computes in ~10 us; BentoML's own per-request cost (~1 ms: ASGI, "
        "JSON, pydantic, response) is 100x that, so no server can reach 50 % of in-process here. "
        "With real work per request (CNN, batch 64, base64 inputs) the ratio is 0.64-0.80."
    ),
}


def _machine(device: str) -> dict:
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    for name in ("onnxruntime", "onnx", "bentoml", "scipy"):
        with contextlib.suppress(ImportError):
            info[name] = importlib.import_module(name).__version__
    return info


def _lookup(result: dict, key_path: str):
    value = result
    for part in key_path.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple) and len(value) > 8:
        return f"[{len(value)} values]"
    return str(value)


def _render(value, depth: int = 0) -> list[str]:
    """A result dict as markdown: a table for a dict of flat dicts, bullets otherwise."""
    lines: list[str] = []
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        flat = all(not isinstance(x, dict) for v in value.values() for x in v.values())
        if flat:
            cols = list(dict.fromkeys(k for v in value.values() for k in v))
            lines.append("| case | " + " | ".join(cols) + " |")
            lines.append("|---" * (len(cols) + 1) + "|")
            for case, row in value.items():
                lines.append(f"| {case} | " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
            return lines + [""]
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict):
                lines.append(f"{'  ' * depth}- **{key}**")
                lines += _render(item, depth + 1)
            else:
                lines.append(f"{'  ' * depth}- {key}: {_fmt(item)}")
        return lines
    return [f"{'  ' * depth}- {_fmt(value)}"]


def _check(op: str, value: float, target: float) -> bool:
    return value <= target if op == "<=" else value >= target


def _load(path: Path) -> dict:
    """The results stored so far (``{name: {"result", "seconds", "when", "command"}}``)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _save(path: Path, stored: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(stored, indent=1, default=str, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _measure(names: list[str], quick: bool, device: str) -> dict:
    """Run the benchmarks ``names``: ``{name: entry}``, a broken one with its traceback."""
    done: dict[str, dict] = {}
    command = f"python -m benchmarks.run{' --quick' if quick else ''}"
    command += f" --device {device}" if device != "cpu" else ""
    for name in names:
        print(f"== {name}", flush=True)
        begin = time.perf_counter()
        entry: dict = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": command,
        }
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            entry["result"] = module.run(quick=quick, device=device)
            print(json.dumps(entry["result"], indent=1, default=str)[:3000])
        except Exception:  # a broken benchmark is reported, the others still run
            entry["failed"] = traceback.format_exc()
            print(entry["failed"], file=sys.stderr)
        entry["seconds"] = round(time.perf_counter() - begin, 1)
        done[name] = entry
    return done


def _report(stored: dict, machine: dict) -> str:
    """RESULTS.md: the targets table over every stored result, then one section each."""
    names = sorted(stored)
    lines = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks.run` from `benchmarks/results.json`; each section says "
        "when it was measured. Timings are medians over repeated runs after warm-up; every ratio "
        "is measured side by side in the same run.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += [
        "",
        "## Targets",
        "",
        "| benchmark | ratio | value | target | met |",
        "|---|---|---|---|---|",
    ]
    why: list[str] = []
    for bench, key, op, target, meaning in TARGETS:
        if bench not in stored:
            continue
        value = _lookup(stored[bench].get("result") or {}, key)
        if not isinstance(value, int | float):
            lines.append(f"| {bench} | {meaning} | not measured | {op} {target} | — |")
            continue
        ok = _check(op, float(value), target)
        lines.append(
            f"| {bench} | {meaning} | {value:.3g} | {op} {target} | "
            f"{'yes' if ok else '**missed**'} |"
        )
        if not ok:
            why.append(f"- **{meaning}**: {WHY_MISSED.get(meaning, 'not explained yet')}")
    if why:
        lines += ["", "### Missed targets, and why", ""] + why
    for name in names:
        entry = stored[name]
        lines += [
            "",
            f"## {name}",
            "",
            f"`python -m benchmarks.bench_{name}` ({entry.get('seconds', 0):.0f} s, "
            f"{entry.get('when', 'date unknown')}, `{entry.get('command', '')}`)",
            "",
        ]
        if "failed" in entry:
            lines += ["Failed:", "", "```", str(entry["failed"]).strip(), "```"]
            continue
        result = entry.get("result")
        notes = result.get("notes") if isinstance(result, dict) else None
        body = (
            {k: v for k, v in result.items() if k != "notes"}
            if isinstance(result, dict)
            else result
        )
        lines += _render(body)
        if notes:
            lines += ["", "Notes:", ""] + [
                f"- {n}" for n in (notes if isinstance(notes, list) else [notes])
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run that checks the suite works (prints only)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--only",
        nargs="*",
        help="benchmark names (e.g. align ensemble); the others' stored results stay in RESULTS.md",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave RESULTS.md alone"
    )
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)

    names = sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in args.only]
    measured = _measure(names, args.quick, args.device)
    failures = [n for n, entry in measured.items() if "failed" in entry]
    if args.quick:  # a check that the suite works: it never replaces measurements
        print("quick run: RESULTS.md and results.json left alone")
    elif not args.no_write:
        store = Path(args.out).with_name(RESULTS_JSON)
        stored = {**_load(store), **measured}
        known = {p.stem[len("bench_") :] for p in HERE.glob("bench_*.py")}
        stored = {n: e for n, e in stored.items() if n in known}  # removed benchmarks go
        _save(store, stored)
        Path(args.out).write_text(_report(stored, _machine(args.device)))
        print(f"wrote {args.out}")
    print(f"benchmarks: {len(names) - len(failures)} ran, {len(failures)} broke")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
