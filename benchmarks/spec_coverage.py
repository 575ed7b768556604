"""How many torchvision architectures get a permutation spec that is proven correct.

For every builder of ``torchvision.models.list_models(module=torchvision.models)`` (random
weights, ``num_classes=10``) this builds the model, infers its spec
(:func:`models.infer.infer_spec`), perturbs its state (:func:`models.verify.perturb_state`:
random init hides spec errors) and proves the spec with
:func:`models.verify.check_permutation_invariance`. A builder is

* **handled** when the spec is inferred and the check passes (float64, ``atol`` 1e-6; with
  ``--float32-above M``, float32 and ``atol`` 1e-4 for models over M million parameters, for
  machines with less memory: the largest, regnet_y_128gf and vit_h_14, peak at 12-13 GiB in
  float64);
* **refused** when :class:`models.infer.SpecInferenceError` is raised (the model cannot be
  traced), with its reason;
* **failed** when the check fails or anything else goes wrong, with the reason.

Each builder runs in its own process (forked from a server that has imported torch once), so
memory is returned between models and a crash stops one row, not the run. Inputs are a batch of
4 at 64x64, or larger where an architecture needs it (see :func:`input_size`).

    python -m benchmarks.spec_coverage [--quick] [--only NAME ...] [--out FILE]

``--quick`` runs the smallest builder of each family (by torchvision's parameter count).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = [
    "builders",
    "reference_params",
    "smallest_per_family",
    "input_size",
    "measure",
    "coverage",
    "summarise",
    "render",
]

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "SPEC_COVERAGE.md"

BATCH = 4
PERTURB_SCALE = 0.2
RETRY_SCALE = 0.05  # a second check when the first fails (see measure)
TIMEOUT_S = 1800.0
STATUSES = ("handled", "refused", "failed")

_UNITS = re.compile(r"\((\d+) units\)")


def builders() -> dict[str, str]:
    """Every torchvision classification builder -> its family (the module that defines it)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return {
        name: torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        for name in names
    }


def reference_params(name: str) -> int:
    """torchvision's parameter count for ``name`` (ImageNet head), read without building it."""
    import torchvision

    weights = list(torchvision.models.get_model_weights(name))
    return int(weights[0].meta.get("num_params", 0)) if weights else 0


def smallest_per_family(names: Iterable[str] | None = None) -> list[str]:
    """The builder with the fewest parameters of each family, in family order."""
    families = builders()
    best: dict[str, tuple[int, str]] = {}
    for name in names if names is not None else families:
        size = reference_params(name)
        family = families[name]
        if family not in best or size < best[family][0]:
            best[family] = (size, name)
    return [best[f][1] for f in sorted(best)]


def input_size(name: str) -> int:
    """Side of the square input ``name`` is checked at.

    64 unless the architecture needs more: ViT fixes its image size (224) and Swin / MaxViT
    need 224 for their windows; Inception-v3's auxiliary head, which runs in train mode while
    the perturbed state's BN statistics are refreshed, needs its native 299 (a 17x17 map
    before its 5x5 pooling and 5x5 convolution).
    """
    if name.startswith(("vit_", "swin_", "maxvit_")):
        return 224
    if name.startswith("inception"):
        return 299
    return 64


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def measure(name: str, float32_above: float | None = None) -> dict:
    """Build ``name``, infer its spec, perturb its state and check the spec (one table row).

    The check runs in float64 (``atol`` 1e-6), or in float32 (``atol`` 1e-4) when the model has
    more than ``float32_above`` parameters. float32 is a fallback for small machines, not the
    default: on regnet_y_128gf its rounding alone reaches 8.7e-5, too close to the tolerance
    to tell a wrong spec from rounding.
    """
    import logging
    import resource
    import warnings

    import torch
    import torchvision

    from modeconn.models.infer import SpecInferenceError, infer_spec
    from modeconn.models.verify import SpecCheckError, check_permutation_invariance, perturb_state

    warnings.filterwarnings("ignore")
    logging.getLogger("models").setLevel(logging.ERROR)  # the row reports unused keys itself
    begin = time.perf_counter()
    size = input_size(name)
    row: dict = {"name": name, "family": builders()[name], "input": size}
    try:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
        params = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
        row["params_m"] = params / 1e6
        x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
        tic = time.perf_counter()
        try:
            inferred = infer_spec(model, x)
        except SpecInferenceError as err:
            row.update(status="refused", reason=_first_line(err))
            return row  # completed by the finally clause
        row["infer_s"] = time.perf_counter() - tic
        units = sum(inferred.groups.values())
        frozen = sum(int(m.group(1)) for m in map(_UNITS.search, inferred.frozen) if m)
        row.update(
            tracer=inferred.tracer,
            groups=len(inferred.groups),
            units=units,
            frozen_sets=len(inferred.frozen),
            frozen_units=frozen,
            frozen_fraction=frozen / (units + frozen) if units + frozen else 0.0,
            first_frozen=inferred.frozen[0] if inferred.frozen else "",
            unused=len(inferred.unused),
        )
        big = float32_above is not None and params > float32_above
        dtype, atol = (torch.float32, 1e-4) if big else (torch.float64, 1e-6)
        row["check"] = "float32" if big else "float64"
        row["perturb"] = PERTURB_SCALE
        state = perturb_state(model, x, seed=0, scale=PERTURB_SCALE)
        try:
            row["diff"] = check_permutation_invariance(
                model, inferred.spec, x, state=state, seed=0, atol=atol, dtype=dtype
            )
        except SpecCheckError as err:
            # perturb_state refreshes BN statistics in train mode, where stochastic depth drops
            # whole blocks: in a deep network the eval-mode activations can then blow up
            # (outputs ~1e5) until rounding alone moves them. A wrong spec fails at any scale,
            # so the check is run once more, closer to the initialisation.
            del state
            row["first_check"] = _first_line(err)
            row["perturb"] = RETRY_SCALE
            state = perturb_state(model, x, seed=1, scale=RETRY_SCALE)
            row["diff"] = check_permutation_invariance(
                model, inferred.spec, x, state=state, seed=0, atol=atol, dtype=dtype
            )
        row["status"] = "handled"
    except Exception as err:  # the check's own error and anything else: one failed row
        row.update(status="failed", reason=_first_line(err))
        row["where"] = traceback.format_exc().strip().splitlines()[-3:]
    finally:
        row["seconds"] = time.perf_counter() - begin
        # ru_maxrss is in KiB on Linux: this process's peak, the forked server's pages included.
        row["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def _child(name: str, float32_above: float | None, conn) -> None:
    try:
        conn.send(measure(name, float32_above))
    finally:
        conn.close()


def _context():
    ctx = multiprocessing.get_context("forkserver")
    # Imported once by the server; every child is forked from it, so starts in well under 1 s.
    ctx.set_forkserver_preload(
        ["torch", "torchvision", "modeconn.models.infer", "modeconn.models.verify"]
    )
    return ctx


def _run_child(ctx, name: str, timeout: float, float32_above: float | None) -> dict:
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(name, float32_above, sender), name=f"spec-{name}")
    process.start()  # the first start also starts the fork server (imports torch)
    begin = time.perf_counter()
    sender.close()  # so that recv() sees EOF when the child dies
    row, timed_out = None, False
    try:
        if receiver.poll(timeout):
            row = receiver.recv()
        else:
            timed_out = True
    except EOFError:  # the child died before sending its row
        pass
    finally:
        process.join(5.0 if row is not None else 0.1)
        if process.is_alive():
            process.kill()
            process.join()
        receiver.close()
    if row is not None:
        return row
    code = process.exitcode
    if timed_out:
        why = f"worker timed out after {timeout:.0f} s"
    elif code == -9:
        why = "worker killed by SIGKILL (out of memory?)"
    else:
        why = f"worker died with exit code {code}"
    return {
        "name": name,
        "family": builders()[name],
        "input": input_size(name),
        "status": "failed",
        "reason": why,
        "seconds": time.perf_counter() - begin,
    }


def coverage(
    names: Iterable[str],
    *,
    timeout: float = TIMEOUT_S,
    float32_above: float | None = None,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per builder in ``names``, each measured in a fresh process (see :func:`measure`)."""
    ctx = _context()
    rows = []
    for name in names:
        row = _run_child(ctx, name, timeout, float32_above)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Counts per status, overall and per family; ``handled_percent`` of all builders run."""
    total = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    families: dict[str, dict] = {}
    for row in rows:
        counts = families.setdefault(row["family"], {"builders": 0, **dict.fromkeys(STATUSES, 0)})
        counts["builders"] += 1
        counts[row["status"]] += 1
    return {
        "builders": len(rows),
        **total,
        "handled_percent": 100.0 * total["handled"] / len(rows) if rows else 0.0,
        "float32_checks": sum(r.get("check") == "float32" for r in rows),
        "seconds": sum(r.get("seconds", 0.0) for r in rows),
        "families": dict(sorted(families.items())),
    }


def _cell(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _row_cells(r: dict) -> list[str]:
    def num(key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "—"

    if "frozen_sets" not in r:
        left = "—"
    else:
        left = "0" if not r["frozen_sets"] else f"{r['frozen_fraction']:.1%} ({r['frozen_sets']})"
    if r["status"] == "handled":
        check = f"{r['check']}, {r['diff']:.1e}"
        if "first_check" in r:
            check += f" (scale {r['perturb']}\\*)"
        why = _cell(r["first_frozen"], 150)
    else:
        check = r.get("check", "—")
        why = _cell(r.get("reason", ""), 160)
    return [
        r["family"],
        f"`{r['name']}`",
        num("params_m", ".1f"),
        str(r["input"]),
        r["status"] if r["status"] == "handled" else f"**{r['status']}**",
        r.get("tracer", "—"),
        num("groups", "d"),
        num("units", "d"),
        left,
        why,
        num("unused", "d"),
        check,
        num("infer_s", ".1f"),
        num("peak_gib", ".1f"),
        f"{r['seconds']:.1f}",
    ]


def _precision(s: dict) -> str:
    if not s["float32_checks"]:
        return "float64, atol 1e-6, for every builder"
    return (
        f"float64, atol 1e-6; float32, atol 1e-4, for the {s['float32_checks']} builders marked "
        "so in the *check* column"
    )


def render(rows: list[dict], command: str) -> str:
    """The coverage report as markdown: the figure, a table per family, a row per builder."""
    s = summarise(rows)
    lines = [
        "# Permutation-spec coverage of torchvision",
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{s['builders']} builders, one after another, in {s['seconds'] / 60:.0f} min.",
        "",
        f"**Handled and verified: {s['handled']}/{s['builders']} ({s['handled_percent']:.0f} %)**; "
        f"refused {s['refused']}, failed {s['failed']}.",
        "",
        "Each builder of `torchvision.models.list_models(module=torchvision.models)`, random "
        "weights, `num_classes=10`, in its own process: `infer_spec` on a batch of "
        f"{BATCH} (64x64 unless noted), then `check_permutation_invariance` on "
        f"`perturb_state(scale={PERTURB_SCALE})` (random init hides spec errors; when that "
        f"check fails it runs once more at scale {RETRY_SCALE}, see the note under the table). "
        "*Handled*: "
        f"the check passes ({_precision(s)}). "
        "*Refused*: the model cannot be traced (`SpecInferenceError`). *Failed*: the check "
        "fails or something else raises.",
        "",
        "Columns: *units*, the hidden units permuted (sum of group sizes); *left unpermuted*, "
        "the share of hidden units the spec leaves in place (and how many sets of them), with "
        "the first reason; *unused*, state-dict keys the eval-mode forward never reads; "
        "*check*, its precision and the largest relative output change; *infer*, the time "
        "`infer_spec` took; *peak*, the process's peak RSS; *total*, the whole row (build, "
        "inference, perturbation, check) on a shared machine.",
        "",
        "## By family",
        "",
        "| family | builders | handled | refused | failed |",
        "|---|---|---|---|---|",
    ]
    for family, c in s["families"].items():
        lines.append(
            f"| {family} | {c['builders']} | {c['handled']} | {c['refused']} | {c['failed']} |"
        )
    lines += [
        "",
        "## By builder",
        "",
        "| family | builder | params (M) | input | status | tracer | groups | units "
        "| left unpermuted | first reason | unused | check | infer (s) | peak (GiB) | total (s) |",
        "|---" * 15 + "|",
    ]
    for r in sorted(rows, key=lambda r: (r["family"], r["name"])):
        lines.append("| " + " | ".join(_row_cells(r)) + " |")
    retried = [r for r in rows if "first_check" in r]
    if retried:
        lines += [
            "",
            f"\\* Checked again at perturbation scale {RETRY_SCALE}. `perturb_state` refreshes BN "
            "statistics with the whole network in train mode, where stochastic depth drops "
            "blocks at random; in a deep network the eval-mode activations can then reach 1e5 "
            "and rounding alone moves the outputs. A wrong spec fails at every scale.",
            "",
        ]
        for r in retried:
            then = f"{r['diff']:.1e}, it passes" if "diff" in r else r.get("reason", "")
            lines.append(
                f"- `{r['name']}`: at scale {PERTURB_SCALE}, {r['first_check']}; "
                f"at scale {r['perturb']}: {then}"
            )
    broken = [r for r in rows if r["status"] != "handled"]
    if broken:
        lines += ["", "## Refused and failed, in full", ""]
        lines += [f"- `{r['name']}` ({r['status']}): {r.get('reason', '')}" for r in broken]
    return "\n".join(lines) + "\n"


def _print_row(row: dict) -> None:
    text = f"{row['name']:<22} {row['status']:<8} {row['seconds']:7.1f} s"
    if row["status"] == "handled":
        text += (
            f"  groups={row['groups']} units={row['units']} left={row['frozen_fraction']:.1%}"
            f" check={row['check']} diff={row['diff']:.1e} peak={row['peak_gib']:.1f} GiB"
        )
    else:
        text += f"  {row.get('reason', '')}"
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="only the smallest builder of each family"
    )
    parser.add_argument("--only", nargs="*", help="builder names (default: all)")
    parser.add_argument(
        "--out",
        help=f"markdown file to write (default: {DEFAULT_OUT.relative_to(HERE.parent)} for a "
        "full run, nothing otherwise)",
    )
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per builder")
    parser.add_argument(
        "--float32-above",
        type=float,
        metavar="M",
        help="check models over M million parameters in float32 (atol 1e-4), to save memory",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    every = builders()
    names = list(every)
    if args.only:
        unknown = sorted(set(args.only) - set(every))
        if unknown:
            parser.error(f"unknown builder(s) {unknown}; see torchvision.models.list_models()")
        names = [n for n in names if n in args.only]
    if args.quick:
        names = smallest_per_family(names)
    float32_above = None if args.float32_above is None else args.float32_above * 1e6
    rows = coverage(names, timeout=args.timeout, float32_above=float32_above, progress=_print_row)
    s = summarise(rows)
    print(
        f"handled and verified: {s['handled']}/{s['builders']} ({s['handled_percent']:.0f} %); "
        f"refused {s['refused']}, failed {s['failed']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    out = args.out or (DEFAULT_OUT if not (args.quick or args.only) else None)
    if out:
        command = "python -m benchmarks.spec_coverage" + (" --quick" if args.quick else "")
        Path(out).write_text(render(rows, command))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
