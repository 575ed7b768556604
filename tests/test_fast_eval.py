"""Fast evaluation: BatchNorm statistics from a seeded subset of the training inputs, recorded in
the artifact and used by everything that recomputes them; ``modeconn evaluate`` with torch by
default, ONNX from the serving bundle when asked, one log line per artifact."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeconn.artifact import load_artifact
from modeconn.bn import DEFAULT_BN_EXAMPLES, bn_subset, check_bn_examples, split_state
from modeconn.checkpoint import load_checkpoint
from modeconn.evaluate import evaluate_path
from modeconn.formats import MANIFEST_FILE, Manifest, read_index
from modeconn.merge import merge_at
from modeconn.paths import linear
from modeconn.pipeline import fit_artifact

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cnn_linear(tmp_path_factory, bn_pair, digits) -> Path:
    """The straight path between the digits BatchNorm CNNs, BN statistics from 256 inputs, with
    a serving bundle (K = 2; merged t = 0, 0.5, 1)."""
    from modeconn.serving import build_serving

    a, b = (load_checkpoint(p) for p in bn_pair)
    out = tmp_path_factory.mktemp("fast_eval") / "cnn_linear"
    fit_artifact(
        a, b, digits, "linear", out=out, eval_points=3, served_ts=[0.0, 0.5, 1.0], bn_examples=256
    )
    build_serving(out, ks=(2,), ts=(0.0, 0.5, 1.0), cascade=0)
    return out


def test_bn_subset_is_fixed_seeded_and_shuffled():
    x = torch.arange(1000.0).unsqueeze(1)  # (1000, 1)
    first, again = bn_subset(x, 100), bn_subset(x.clone(), 100)
    assert first.shape == (100, 1) and torch.equal(first, again)  # same inputs, same subset
    assert len(set(first.squeeze(1).tolist())) == 100  # without replacement
    assert not torch.equal(first, first.sort(0).values)  # batches mix a sorted data set
    for everything in (None, 0, 1000, 5000):
        assert bn_subset(x, everything) is x  # all of them, in their order
    assert check_bn_examples(0) is None and check_bn_examples(7) == 7
    for bad in (-1, 2.5, True, "512"):
        with pytest.raises(ValueError, match="bn_examples"):
            bn_subset(x, bad)  # type: ignore[arg-type]


def test_cli_default_matches_the_library():
    from modeconn.commands import _common

    assert _common.BN_EXAMPLES == DEFAULT_BN_EXAMPLES


def test_subset_statistics_stay_close_to_the_whole_training_set(bn_pair, digits):
    """On the straight path between two digits CNNs (its midpoint is the worst case: a broken
    network whose statistics matter most), BN from 512 of the 1,437 training inputs against
    all of them. Measured: max relative test loss difference 0.014, test accuracy identical at
    every t; bounds 0.05 and 2 points (7 of 360 test digits). The default (2048) takes all of
    digits' 1,437, so it is exact here."""
    a, b = (load_checkpoint(p) for p in bn_pair)
    model = a.build_model()
    path = linear(split_state(model, a.state)[0], split_state(model, b.state)[0])
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    full = evaluate_path(model, path, digits, ts=ts, bn_examples=None)
    default = evaluate_path(model, path, digits, ts=ts)
    assert default.test_loss == full.test_loss  # 2048 >= 1,437: the whole set
    subset = evaluate_path(model, path, digits, ts=ts, bn_examples=512)
    loss = [abs(s - f) / f for s, f in zip(subset.test_loss, full.test_loss)]
    acc = [abs(s - f) for s, f in zip(subset.test_acc, full.test_acc)]
    assert max(loss) <= 0.05
    assert max(acc) <= 0.02


def test_manifest_records_the_subset_and_older_ones_mean_all(cnn_linear):
    raw = json.loads((cnn_linear / MANIFEST_FILE).read_text())
    assert raw["bn_examples"] == 256
    del raw["bn_examples"]  # as written before the field existed
    assert Manifest.model_validate(raw).bn_examples is None  # the whole training set
    with pytest.raises(ValueError):
        Manifest.model_validate({**raw, "bn_examples": 0})  # None says "all"; 0 is not stored


def test_every_consumer_recomputes_from_the_same_subset(cnn_linear, digits):
    """Statistics recomputed later (ensembles, merges, ONNX export, evaluate) are exactly the
    ones the fit stored: the same seeded subset, read from the manifest."""
    artifact = load_artifact(cnn_linear)
    assert artifact.bn_inputs(digits.x_train).shape[0] == 256
    recomputed = merge_at(artifact, 0.5, inputs=digits.x_train, bn="recompute")
    stored = artifact.buffers[0.5]
    for key, value in stored.items():
        assert torch.equal(recomputed[key], value), key


def test_onnx_rows_from_the_bundle_agree_with_torch(cnn_linear, digits, caplog):
    from modeconn.report import evaluate_artifact

    torch_rows = {r.label: r.metrics for r in evaluate_artifact(cnn_linear, digits, ks=(2,))}
    with caplog.at_level(logging.INFO, logger="modeconn"):
        onnx_rows = evaluate_artifact(cnn_linear, digits, ks=(2,), backend="onnx")
    assert re.search(r"[4-5] of 6 graphs from the serving bundle", caplog.text), caplog.text
    for row in onnx_rows:
        expected = torch_rows[row.label]
        assert row.metrics["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
        assert row.metrics["nll"] == pytest.approx(expected["nll"], abs=1e-4), row.label
        assert row.metrics["disagreement"] == pytest.approx(expected["disagreement"], abs=1e-6)


def test_evaluate_logs_one_line_per_artifact(cnn_linear, tmp_path):
    """A fresh process (the CUDA fallback is said once per process): two artifacts evaluated by
    onnxruntime, from their bundles but for the straight midpoint, which is exported."""
    second = tmp_path / "copy"
    shutil.copytree(cnn_linear, second)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "modeconn", "evaluate", str(cnn_linear), str(second)]
    done = subprocess.run(
        [*argv, "--k", "2", "--backend", "onnx"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    per_artifact = [line for line in lines if "evaluated" in line]
    fallback = [line for line in lines if "CUDA unavailable" in line]
    assert len(per_artifact) == 2, lines
    # Rows A, B, A+B, straight midpoint (never in a bundle), path midpoint, K=2: all but the
    # straight midpoint come from the bundle, unless building one of their graphs was skipped.
    index = read_index(cnn_linear)
    wanted = [("merged", [0.0]), ("merged", [1.0]), ("ensemble", [0.0, 1.0])]
    wanted += [("merged", [0.5]), ("ensemble", [0.0, 1.0])]
    reused = sum(index.find(mode, ts) is not None for mode, ts in wanted)
    assert reused >= 4 and f"{reused} of 6 graphs from the serving bundle" in per_artifact[0]
    assert len(fallback) <= 1, lines
    assert len(lines) == len(per_artifact) + len(fallback), lines
