"""The device check (``benchmarks/device_check.py``) passes end to end on CPU: every step
through the real command line, one and two processes agree, the service runs on CPU."""

import json
import math

import pytest


@pytest.mark.slow
def test_device_check_passes_on_cpu(tmp_path, capsys):
    from benchmarks.device_check import main

    out = tmp_path / "device_check.json"
    result = main(["--device", "cpu", "--out", str(out)])

    report = json.loads(out.read_text())  # well-formed JSON, no NaN
    assert report == result
    failed = {n: s for n, s in report["steps"].items() if s["status"] != "ok"}
    assert not failed, json.dumps(failed, indent=2)
    assert report["ok"] and report["failed"] == []
    assert set(report["steps"]) == {
        "train_seed0",
        "train_seed1",
        "connect_1proc",
        "connect_torchrun",
        "export_midpoint",
        "export_ensemble_k4",
        "serve_build",
        "serve",
    }
    assert all(step["seconds"] > 0 for step in report["steps"].values())

    connect = report["figures"]["connect"]
    assert connect["torchrun"]["nproc"] == 2
    for fit in (connect["one_process"], connect["torchrun"]):
        assert fit["steps"] > 0 and fit["ms_per_step"] > 0 and fit["wall_s"] > 0
    assert connect["one_process"]["steps"] == connect["torchrun"]["steps"]
    # An MLP without BatchNorm, gradients summed over the ranks: equal up to float rounding.
    assert 0 <= connect["max_abs_node_diff"] <= 1e-5

    export = report["figures"]["export"]
    assert export["midpoint_max_abs_diff"] <= 1e-4
    assert export["ensemble_k4_max_abs_diff"] <= 1e-4

    serve = report["figures"]["serve"]
    assert serve["provider"] == "CPUExecutionProvider"
    assert serve["k"] == 4 and serve["requests"] == 50
    assert math.isfinite(serve["latency_ms_p50"]) and serve["latency_ms_p50"] > 0
    assert report["steps"]["serve"]["stop"]["returncode"] is not None  # stopped by SIGTERM

    assert (
        report["machine"]["torch"]
        and "CPUExecutionProvider" in (report["machine"]["onnxruntime_providers"])
    )
    assert "all steps passed" in capsys.readouterr().out
