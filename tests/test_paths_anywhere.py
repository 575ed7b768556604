"""Artifacts store absolute data and endpoint paths, so every command works from any working
directory; older artifacts with a relative data path still work, or say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modeconn.checkpoint import load_checkpoint
from modeconn.cli import main
from modeconn.data import load_data
from modeconn.formats import MANIFEST_FILE, absolute_data_spec, resolve_data_spec
from modeconn.pipeline import fit_artifact


@pytest.fixture(scope="module")
def project(tmp_path_factory, bn_pair, digits) -> Path:
    """A project folder: ``data/digits.npz`` and an artifact ``runs/linear`` fitted from inside
    it with ``--data npz:data/digits.npz`` (a relative path)."""
    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    np.savez(
        root / "data" / "digits.npz",
        x_train=digits.x_train.numpy(),
        y_train=digits.y_train.numpy(),
        x_test=digits.x_test.numpy(),
        y_test=digits.y_test.numpy(),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        data = load_data("npz:data/digits.npz")
        a, b = (load_checkpoint(p) for p in bn_pair)
        fit_artifact(a, b, data, "linear", out="runs/linear", eval_points=0, served_ts=[0.0, 1.0])
    return root


def test_specs_are_made_absolute_and_found_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_data_spec("digits") == "digits"
    assert absolute_data_spec("npz:d/x.npz") == f"npz:{tmp_path / 'd' / 'x.npz'}"
    assert (
        absolute_data_spec("imagefolder:imgs?size=28", "/data") == "imagefolder:/data/imgs?size=28"
    )
    assert resolve_data_spec("npz:/abs/x.npz", tmp_path) == "npz:/abs/x.npz"  # as recorded


def test_artifact_records_absolute_paths(project):
    manifest = json.loads((project / "runs" / "linear" / MANIFEST_FILE).read_text())
    assert manifest["data"]["name"] == f"npz:{project / 'data' / 'digits.npz'}"
    assert Path(manifest["endpoints"]["a"]["file"]).is_absolute()


def test_evaluate_from_another_folder(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    artifact = Path("..") / project.name / "runs" / "linear"  # a relative artifact path, too
    assert main(["--quiet", "evaluate", str(artifact), "--k", "2"]) == 0
    assert "path ensemble K=2" in capsys.readouterr().out


def _make_old(project: Path, name: str, spec: str) -> Path:
    """A copy of the artifact as written before paths were stored absolute."""
    import shutil

    old = project / "runs" / name
    shutil.copytree(project / "runs" / "linear", old, dirs_exist_ok=True)
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    manifest["data"]["name"] = spec
    manifest.pop("bn_examples", None)
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    return old


def test_older_artifact_with_a_relative_path(project, tmp_path, monkeypatch, capsys):
    old = _make_old(project, "old", "npz:data/digits.npz")
    monkeypatch.chdir(project)  # where it was fitted: as before
    assert main(["--quiet", "evaluate", str(old), "--k", "2"]) == 0
    monkeypatch.chdir(tmp_path)  # elsewhere: found from the artifact's folders
    assert main(["--quiet", "evaluate", str(old), "--k", "2"]) == 0
    gone = _make_old(project, "moved", "npz:moved/digits.npz")
    assert main(["--quiet", "evaluate", str(gone), "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert "relative to the folder it was fitted from" in err and "--data npz:" in err
