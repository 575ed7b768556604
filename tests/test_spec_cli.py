"""``modeconn spec`` shows and writes a proven spec; ``--spec FILE`` aligns with it, and a wrong
or malformed file is refused with one line."""

from __future__ import annotations

import json

from modeconn.cli import main


def test_spec_is_shown_written_and_used_for_alignment(mlp_pair, tmp_path, capsys):
    a, b = mlp_pair
    out = tmp_path / "mlp.json"
    assert main(["-q", "spec", a, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "P_layers.0" in text and "2 permutation groups (64 units)" in text and "proven" in text
    saved = json.loads(out.read_text())
    assert saved["groups"] == {"P_layers.0": 32, "P_layers.1": 32}
    assert saved["spec"]["layers.1.weight"] == ["P_layers.1", "P_layers.0"]
    assert saved["model"]["name"] == "mlp"

    aligned = tmp_path / "b_aligned.safetensors"
    args = ["-q", "align", a, b, "--out", str(aligned), "--points", "0"]
    assert main([*args, "--spec", str(out)]) == 0
    assert "objective" in capsys.readouterr().out

    # Forget that layer 1 reads layer 0's units: proven wrong before any matching.
    saved["spec"]["layers.1.weight"] = ["P_layers.1", None]
    out.write_text(json.dumps(saved))
    assert main([*args, "--spec", str(out)]) == 1
    assert "changes the network's outputs" in capsys.readouterr().err

    assert main([*args, "--spec", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err

    out.write_text("{not json")
    assert main([*args, "--spec", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_spec_of_an_architecture_by_name(tmp_path, capsys):
    assert main(["-q", "spec", "--model", "cnn", "--arg", "channels=[4, 8]"]) == 0
    assert "2 permutation groups (12 units)" in capsys.readouterr().out
    assert main(["-q", "spec"]) == 2
    assert "give a checkpoint file or --model" in capsys.readouterr().err
