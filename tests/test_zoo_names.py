"""Architectures named from outside the registry: torchvision, timm and the user's own modules."""

import sys
import warnings

import pytest
import torch
from torch import nn

from modeconn.checkpoint import ModelSpec, model_spec_of
from modeconn.formats import ModelInfo
from modeconn.models import create_model

USER_MODULE = '''
from torch import nn


class TinyNet(nn.Module):
    """Takes the registry's arguments by name: input_shape and num_classes."""

    def __init__(self, input_shape, width=8, num_classes=10):
        super().__init__()
        features = 1
        for d in input_shape:
            features *= d
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)
        self.body.eval()  # a submodule in its own mode, which create_model must keep

    def forward(self, x):
        return self.head(self.body(x))


def fixed_head(width=8):
    """Ten outputs whatever the data: takes no num_classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def lazy(num_classes):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


def not_a_model():
    return "a string"


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``zoo_user_nets``, written to a folder on ``sys.path``."""
    (tmp_path / "zoo_user_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("zoo_user_nets", None)
    yield "zoo_user_nets"
    sys.modules.pop("zoo_user_nets", None)


def _logits(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(3, *shape))


def test_torchvision_builder_is_built_without_weights_for_the_classes():
    model = create_model("torchvision:resnet18", (3, 16, 16), 7)
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 7
    assert model.training  # the shape check ran in eval mode and put it back
    assert _logits(model, (3, 16, 16)).shape == (3, 7)
    assert model.modeconn_config == {
        "name": "torchvision:resnet18",
        "input_shape": [3, 16, 16],
        "num_classes": 7,
        "kwargs": {},
    }


def test_torchvision_class_builds_a_small_vision_transformer():
    kwargs = dict(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    model = create_model("torchvision:VisionTransformer", (3, 32, 32), 10, **kwargs)
    assert type(model).__name__ == "VisionTransformer"
    assert sum(p.numel() for p in model.parameters()) < 50_000
    assert _logits(model, (3, 32, 32)).shape == (3, 10)
    # rebuilt from its description, as an artifact does, it has the same state dict layout
    again = model_spec_of(model).build()
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_torchvision_init_warnings_are_silenced():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = create_model("torchvision:googlenet", (3, 16, 16), 10, aux_logits=False)
    assert _logits(model, (3, 16, 16)).shape == (3, 10)


def test_user_module_callable_gets_the_arguments_it_takes(user_module):
    model = create_model(f"{user_module}:TinyNet", (1, 8, 8), 5, width=4)
    assert model.head.out_features == 5 and model.body[1].in_features == 64
    # every module keeps its own train/eval mode through the shape check
    assert model.training and not model.body.training
    assert model.modeconn_config["kwargs"] == {"width": 4}
    spec = ModelSpec.from_json(model.modeconn_config)
    assert type(spec.build()).__name__ == "TinyNet"

    fixed = create_model(f"{user_module}:fixed_head", (1, 8, 8), 10, width=4)
    assert _logits(fixed, (1, 8, 8)).shape == (3, 10)

    lazy = create_model(f"{user_module}:lazy", (1, 8, 8), 10)
    assert lazy[1].weight.shape == (10, 64)  # the shape check materialised the lazy layer


@pytest.mark.parametrize(
    "attr, message",
    [
        ("TinyNett", "has no attribute 'TinyNett'; close matches: TinyNet"),
        ("NOT_CALLABLE", "is a int, not a class or function"),
        ("not_a_model", "built a str, not a torch.nn.Module"),
    ],
)
def test_user_module_errors_name_the_problem(user_module, attr, message):
    with pytest.raises(ValueError) as info:
        create_model(f"{user_module}:{attr}", (1, 8, 8), 10)
    assert message in str(info.value)


def test_a_model_that_ignores_num_classes_is_refused_with_its_output_shape(user_module):
    with pytest.raises(ValueError) as info:
        create_model(f"{user_module}:fixed_head", (1, 8, 8), 3)
    assert "to outputs of shape [10], not [3]" in str(info.value)


def test_missing_module_says_how_to_make_it_importable():
    with pytest.raises(ValueError) as info:
        create_model("no_such_pkg.nets:TinyNet", (1, 8, 8), 10)
    assert "cannot import 'no_such_pkg.nets'" in str(info.value)
    assert "PYTHONPATH" in str(info.value)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("torchvision:resnt18", ["unknown torchvision model 'resnt18'", "resnet18", "list_models"]),
        ("torchvision:", ["names nothing after the colon"]),
        ("my nets:Tiny", ["not a registered name", "module.path:Callable"]),
        ("transformer", ["unknown model 'transformer'", "torchvision:NAME"]),
    ],
)
def test_unknown_names_get_close_matches_and_how_to_list_them(name, expected):
    with pytest.raises(ValueError) as info:
        create_model(name, (3, 32, 32), 10)
    for text in expected:
        assert text in str(info.value)


def test_registered_names_cannot_take_a_colon():
    from modeconn.models import register_model

    with pytest.raises(ValueError, match="a colon marks a name outside the registry"):
        register_model("torchvision:mine")(lambda input_shape, num_classes: nn.Identity())


def test_bad_arguments_are_a_value_error():
    with pytest.raises(ValueError, match="bad arguments for model 'torchvision:resnet18'"):
        create_model("torchvision:resnet18", (3, 32, 32), 10, widht=3)
    with pytest.raises(ValueError, match="without pretrained weights"):
        create_model("torchvision:resnet18", (3, 32, 32), 10, weights="DEFAULT")


def test_a_model_that_cannot_take_the_inputs_fails_in_one_line():
    with pytest.raises(ValueError) as info:
        create_model("torchvision:resnet18", (1, 8, 8), 10)
    text = str(info.value)
    assert text.startswith("model torchvision:resnet18 cannot run on inputs of shape [1, 8, 8]: ")
    assert "channels" in text and "\n" not in text


def test_timm_model_by_name():
    pytest.importorskip("timm")
    kwargs = dict(img_size=8, in_chans=1, patch_size=4)
    model = create_model("timm:test_vit", (1, 8, 8), 10, **kwargs)
    assert _logits(model, (1, 8, 8)).shape == (3, 10)
    assert model.modeconn_config["kwargs"] == kwargs
    with pytest.raises(ValueError) as info:
        create_model("timm:test_vitt", (1, 8, 8), 10)
    assert "close matches: test_vit" in str(info.value) and "timm.list_models()" in str(info.value)
    with pytest.raises(ValueError, match="cannot run on inputs of shape"):
        create_model("timm:test_vit", (1, 8, 8), 10)  # patch size 16 does not divide 8


def test_missing_timm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(ValueError) as info:
        create_model("timm:resnet10t", (3, 32, 32), 10)
    assert "pip install -e '.[timm]'" in str(info.value)


def test_manifest_takes_external_model_names():
    info = ModelInfo(
        name="torchvision:resnet18", input_shape=[3, 32, 32], num_classes=10, kwargs={}
    )
    assert ModelSpec.from_json(info.model_dump()).name == "torchvision:resnet18"


def test_cli_connects_plain_files_of_a_user_module_and_rebuilds_it(user_module, tmp_path, capsys):
    from modeconn.cli import main

    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(f"{user_module}:TinyNet", (1, 8, 8), 10, width=8)
        files.append(tmp_path / f"{seed}.pt")
        torch.save(model.state_dict(), files[-1])
    out = tmp_path / "path"
    argv = ["connect", *files, "--model", f"{user_module}:TinyNet", "--arg", "width=8"]
    assert main(["--quiet", *map(str, argv), "--out", str(out), "--eval-points", "0"]) == 0
    # eval-path rebuilds the model from the manifest, importing the user's module again
    sys.modules.pop(user_module)
    assert main(["--quiet", "eval-path", str(out), "--points", "3"]) == 0
    assert "loss barrier" in capsys.readouterr().out
