"""Plain state dicts from elsewhere: trainer wrappers, key prefixes, one-line misfits, the CLI."""

import pathlib

import pytest
import torch
from safetensors.torch import save_file

from modeconn.checkpoint import ModelSpec, fit_state, load_checkpoint
from modeconn.cli import main

#: A digits CNN with BatchNorm, so that the state dict has running statistics and counters.
SPEC = ModelSpec("cnn", (1, 8, 8), 10, {"channels": [4, 8], "norm": "bn"})


@pytest.fixture(scope="module")
def state() -> dict:
    torch.manual_seed(0)
    model = SPEC.build()
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))  # non-trivial BatchNorm statistics and counters
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prefix", ["", "module.", "model.", "_orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_pt_files_are_unwrapped_and_their_prefixes_stripped(state, tmp_path, prefix, wrapper):
    saved = {prefix + k: v for k, v in state.items()}
    if wrapper is not None:
        saved = {wrapper: saved, "epoch": 3, "optimizer": {"state": {}, "lr": 0.1}}
    path = tmp_path / "ckpt.pt"
    torch.save(saved, path)
    ckpt = load_checkpoint(path, model=SPEC)
    assert _same(ckpt.state, state)
    assert ckpt.model == SPEC and ckpt.meta == {"file": str(path)}
    model = ckpt.build_model()
    assert _same(model.state_dict(), state)


def test_a_prefix_that_is_part_of_the_real_names_is_kept():
    reference = {"model.weight": torch.zeros(2), "head.weight": torch.zeros(2)}
    spec = ModelSpec("x", (1,), 2)
    assert list(fit_state(dict(reference), reference, "f", spec)) == list(reference)


def test_safetensors_without_metadata_needs_the_model(state, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"module." + k: v for k, v in state.items()}, str(path))
    with pytest.raises(ValueError, match="plain state dict.*--model"):
        load_checkpoint(path)
    assert _same(load_checkpoint(path, model=SPEC).state, state)


def test_a_file_that_names_its_model_refuses_another(state, tmp_path):
    from modeconn.checkpoint import save_checkpoint

    path = tmp_path / "own.safetensors"
    save_checkpoint(path, SPEC.build(), state=state)
    assert load_checkpoint(path).model == SPEC
    other = ModelSpec("cnn", (1, 8, 8), 10, {"channels": [4, 8]})
    with pytest.raises(ValueError, match="describes its model as cnn"):
        load_checkpoint(path, model=other)


@pytest.mark.parametrize(
    "saved, message",
    [
        (
            {"weights": {"a": torch.zeros(1)}},
            "does not hold a state dict of tensors (its keys: 'weights')",
        ),
        ({"state_dict": {"a": 1}, "epoch": 2}, "does not hold a state dict of tensors"),
        ([torch.zeros(1)], "holds a list, not a state dict"),
    ],
)
def test_anything_but_a_state_dict_is_refused(tmp_path, saved, message):
    path = tmp_path / "odd.pt"
    torch.save(saved, path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, model=SPEC)
    assert message in str(info.value)


class _Payload:
    """Unpickling this would create a file: weights_only loading must refuse it instead."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_pickled_objects_are_never_unpickled(state, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "hook": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_checkpoint(path, model=SPEC)
    assert not marker.exists()


def test_missing_and_unexpected_keys_are_counted_in_one_line(state, tmp_path):
    keys = list(state)
    saved = {k: v for k, v in state.items() if k not in keys[:4]}
    saved.update({"extra.weight": torch.zeros(1), "extra.bias": torch.zeros(1)})
    path = tmp_path / "ckpt.pt"
    torch.save(saved, path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, model=SPEC)
    text = str(info.value)
    assert text == (
        f"{path} does not fit cnn: 4 missing keys ({', '.join(keys[:3])}, ...), "
        "2 unexpected keys (extra.weight, extra.bias)"
    )


def test_a_class_count_mismatch_suggests_the_argument(state, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    spec = ModelSpec(SPEC.name, SPEC.input_shape, 12, SPEC.kwargs)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, model=spec)
    text = str(info.value)
    assert "does not fit cnn: head.weight has shape [10, 8] in the file but [12, 8]" in text
    assert "--arg num_classes=10" in text and "\n" not in text


def test_dropped_batchnorm_counters_are_filled_in(state, tmp_path):
    path = tmp_path / "ckpt.pt"
    dropped = [k for k in state if k.endswith("num_batches_tracked")]
    assert dropped
    torch.save({k: v for k, v in state.items() if k not in dropped}, path)
    ckpt = load_checkpoint(path, model=SPEC)
    assert set(ckpt.state) == set(state)
    assert all(ckpt.state[k].dtype == torch.long and ckpt.state[k].item() == 0 for k in dropped)
    ckpt.build_model()  # loads strictly


def _plain_mlp_pair(folder: pathlib.Path) -> list[pathlib.Path]:
    spec = ModelSpec("mlp", (1, 8, 8), 10, {"width": 16})
    files = []
    for seed, prefix in ((0, ""), (1, "module.")):
        torch.manual_seed(seed)
        state = spec.build().state_dict()
        files.append(folder / f"m{seed}.pt")
        torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, files[-1])
    return files


def test_cli_aligns_plain_state_dicts(tmp_path, capsys, digits):
    a, b = _plain_mlp_pair(tmp_path)
    out = tmp_path / "X.safetensors"
    argv = ["align", a, b, "--model", "mlp", "--arg", "width=16", "--data", "digits"]
    assert main(["--quiet", *map(str, argv), "--out", str(out), "--points", "0"]) == 0
    capsys.readouterr()
    aligned = load_checkpoint(out)  # the result names its model: no --model needed any more
    assert aligned.model == ModelSpec("mlp", (1, 8, 8), 10, {"width": 16})
    original = load_checkpoint(b, model=aligned.model)
    x = digits.x_test[:32]
    with torch.no_grad():
        y_b, y_aligned = original.build_model().eval()(x), aligned.build_model().eval()(x)
    assert torch.allclose(y_b, y_aligned, atol=1e-5)  # permuted, same function
    # a plain file beside one that names its model takes that model: no --model needed
    argv = ["align", out, a, "--arg", "num_classes=10", "--out", tmp_path / "Y.safetensors"]
    assert main(["--quiet", *map(str, argv), "--points", "0"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "is a plain state dict that does not name its model: give --model NAME"),
        (["--model", "mlp"], "does not fit mlp: layers.0.weight has shape [16, 64]"),
        (["--model", "torchvision:resnet18"], "cannot run on inputs of shape [1, 8, 8]"),
    ],
)
def test_cli_errors_for_plain_files_are_one_line(tmp_path, capsys, extra, message):
    a, b = _plain_mlp_pair(tmp_path)
    code = main(["align", str(a), str(b), *extra, "--out", str(tmp_path / "X.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_a_model_option_that_contradicts_the_files(tmp_path, capsys):
    from modeconn.checkpoint import save_checkpoint

    files = [tmp_path / f"{name}.safetensors" for name in "ab"]
    for path in files:
        save_checkpoint(path, ModelSpec("mlp", (1, 8, 8), 10, {"width": 16}).build())
    argv = ["connect", *map(str, files), "--out", str(tmp_path / "p")]
    assert main([*argv, "--model", "cnn"]) == 2
    assert "holds a mlp model, not --model cnn" in capsys.readouterr().err
    assert main([*argv, "--arg", "width=8"]) == 2
    assert "which --arg width=8 contradicts" in capsys.readouterr().err
