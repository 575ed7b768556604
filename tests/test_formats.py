"""The torch-free formats: t matching, and files written by earlier versions get a clear error
that says how to upgrade them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from modeconn.fit.connect import connect
from modeconn.formats import match_t, read_index, unique_ts
from modeconn.io import save_tensors


def test_t_values_match_within_the_tolerance():
    assert match_t(0.5 + 1e-7, [0.0, 0.5, 1.0]) == 0.5
    assert match_t(0.5 + 1e-5, [0.0, 0.5, 1.0]) is None
    assert unique_ts([1.0, 0.5, 0.5 + 1e-9, 0.0]) == [0.0, 0.5, 1.0]


def test_formats_and_reading_need_no_torch():
    code = "import sys, modeconn.formats, modeconn.serving; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_serving_index_of_an_earlier_version_names_the_upgrade(tmp_path):
    (tmp_path / "serving").mkdir()
    old = {"format": "modeconn.serving/1", "name": "x", "method": "bezier", "graphs": []}
    (tmp_path / "serving" / "index.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=f"modeconn serve-build {tmp_path} --force"):
        read_index(tmp_path)


def test_a_fit_state_of_an_earlier_version_is_refused_with_the_way_out(tmp_path):
    state = tmp_path / "fit-state.safetensors"
    save_tensors(state, {"interior": torch.zeros(1, 2)}, {"format": "modeconn.curve-fit/1"})
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
    with pytest.raises(ValueError, match="earlier version.*run without --resume"):
        connect(lambda w: w.pow(2).sum(), a, b, "bezier", checkpoint=state, resume=True)
