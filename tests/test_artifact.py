"""Artifacts, checkpoints and BatchNorm recomputation: round trips, exactness, corruption."""

import json

import pytest
import torch

from modeconn.artifact import load_artifact, save_artifact
from modeconn.bn import recompute_bn
from modeconn.checkpoint import load_checkpoint
from modeconn.fit.objective import model_parameters
from modeconn.pipeline import fit_artifact


@pytest.fixture(scope="module")
def bn_linear(tmp_path_factory, bn_pair, digits):
    a, b = (load_checkpoint(p) for p in bn_pair)
    out = tmp_path_factory.mktemp("art") / "cnn_linear"
    artifact, _ = fit_artifact(a, b, digits, "linear", out=out, eval_points=5)
    return out, a, b, artifact


def test_round_trip_reproduces_the_endpoints_exactly(bn_linear):
    out, a, b, _ = bn_linear
    loaded = load_artifact(out)
    model = loaded.build_model()
    assert loaded.manifest.method == "linear" and loaded.manifest.num_nodes == 2
    for t, ckpt in ((0.0, a), (1.0, b)):
        state = loaded.state_at(t, model)
        params = model_parameters(model, ckpt.state)
        assert all(torch.equal(state[k], params[k]) for k in params)
        model.load_state_dict(state, strict=True)  # parameters + recomputed BN statistics
    assert loaded.manifest.data.fingerprint
    assert loaded.manifest.versions["torch"] == torch.__version__
    assert len(loaded.manifest.metrics["ts"]) == 5


def test_bn_statistics_are_needed_at_unserved_t(bn_linear):
    loaded = load_artifact(bn_linear[0])
    with pytest.raises(ValueError, match="served t values"):
        loaded.state_at(0.123)


def test_recompute_bn_is_the_exact_mean_and_restores_the_module(bn_pair, digits):
    ckpt = load_checkpoint(bn_pair[0])
    model = ckpt.build_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = model_parameters(model, ckpt.state)
    x = digits.x_train
    buffers = recompute_bn(model, params, x, batch_size=len(x))
    # First BatchNorm sees conv(x) directly: its statistics are the batch mean and unbiased variance.
    conv = model.stages[0][0].conv
    h = conv(x).detach()  # (N, C, H, W)
    mean = h.mean(dim=(0, 2, 3))
    var = h.transpose(0, 1).reshape(h.shape[1], -1).var(dim=1, unbiased=True)
    assert torch.allclose(buffers["stages.0.0.norm.running_mean"], mean, atol=1e-5)
    assert torch.allclose(buffers["stages.0.0.norm.running_var"], var, rtol=1e-4)
    # The module is left exactly as it was: buffers, momentum, train mode.
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_truncated_or_corrupt_artifacts_raise_clear_errors(bn_linear, tmp_path):
    import shutil

    out = bn_linear[0]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    nodes = broken / "nodes.safetensors"
    nodes.write_bytes(nodes.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_artifact(broken)

    shutil.rmtree(broken)
    shutil.copytree(out, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["num_nodes"] = 3
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest says 3 nodes"):
        load_artifact(broken)

    manifest["num_nodes"] = 2
    manifest["model"]["kwargs"] = {"channels": [4, 4], "norm": "bn"}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="do not match model"):
        load_artifact(broken)

    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid manifest"):
        load_artifact(broken)
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path / "nowhere")


def test_a_failed_save_leaves_the_previous_artifact_intact(bn_linear, monkeypatch):
    out, _, _, artifact = bn_linear
    before = (out / "nodes.safetensors").read_bytes()

    import modeconn.artifact as art

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(art, "save_tensors", explode)
    with pytest.raises(OSError):
        save_artifact(out, artifact)
    assert (out / "nodes.safetensors").read_bytes() == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".cnn_linear")]
    load_artifact(out)
