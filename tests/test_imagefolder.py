"""``imagefolder:DIR`` data: real digits written as PNG files, loaded back exactly, split like
``digits``, trained on through the CLI; and the one-line errors of a malformed tree."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from modeconn.cli import main
from modeconn.data import load_data

#: Class folder names: sorted as strings, in digit order.
NAMES = [f"c{i}" for i in range(10)]


def _pixels(image: np.ndarray) -> np.ndarray:
    """A digits image (0..16) as 8-bit grey levels."""
    return np.round(image / 16 * 255).astype(np.uint8)  # (8, 8)


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    """One PNG per image in ``root/c<label>/``; the files in the order written."""
    files = []
    for i, (image, label) in enumerate(zip(images, labels)):
        file = root / NAMES[label] / f"{i:04d}.png"
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(image)).save(file)
        files.append(file)
    return files


@pytest.fixture(scope="module")
def raw_digits():
    digits = load_digits()
    return digits.images, digits.target  # (1797, 8, 8) in 0..16, (1797,)


@pytest.fixture(scope="module")
def split_tree(tmp_path_factory, raw_digits):
    """train/ (30 per class) and test/ (10 per class) from the real digits."""
    images, labels = raw_digits
    root = tmp_path_factory.mktemp("imagefolder")
    picks = {"train": [], "test": []}
    for c in range(10):
        where = np.flatnonzero(labels == c)
        picks["train"] += where[:30].tolist()
        picks["test"] += where[30:40].tolist()
    for split, index in picks.items():
        write_tree(root / split, images[index], labels[index])
    return root, picks


def test_a_train_test_tree_loads_exactly_as_pixels_in_0_1(split_tree, raw_digits):
    root, picks = split_tree
    images, labels = raw_digits
    data = load_data(f"imagefolder:{root}")
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert data.class_names == NAMES and data.preprocessing["classes"] == NAMES
    assert (len(data.y_train), len(data.y_test)) == (300, 100)
    # Files are read class by class, each folder sorted: here the order they were written in.
    for x, y, index in ((data.x_train, data.y_train, picks["train"]), (data.x_test, data.y_test, picks["test"])):  # fmt: skip
        order = np.argsort(labels[index], kind="stable")
        expected = _pixels(images[index][order]) / np.float32(255)  # (N, 8, 8)
        assert torch.equal(y, torch.from_numpy(labels[index][order]).long())
        np.testing.assert_allclose(x[:, 0].numpy(), expected, atol=1e-7)
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    recipe = data.preprocessing
    assert recipe["mean"] == [0.0] and recipe["std"] == [1.0] and recipe["ink"] == "as-is"
    # The recorded name reloads the same tensors from anywhere.
    assert data.name == f"imagefolder:{root.resolve()}?size=8"
    assert load_data(data.name).fingerprint() == data.fingerprint()


def test_class_folders_alone_are_split_80_20_like_digits(tmp_path, raw_digits):
    images, labels = raw_digits
    index = np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(3)])  # 60 images
    write_tree(tmp_path, images[index], labels[index])
    data = load_data(f"imagefolder:{tmp_path}")
    assert (len(data.y_train), len(data.y_test), data.num_classes) == (48, 12, 3)
    assert torch.bincount(data.y_test).tolist() == [4, 4, 4]  # stratified
    # The very split of digits: sklearn's seeded stratified 80/20 over the sorted files.
    x = _pixels(images[index]) / np.float32(255)
    _, x_test, _, y_test = train_test_split(
        x, labels[index], test_size=0.2, random_state=0, stratify=labels[index]
    )
    np.testing.assert_allclose(data.x_test[:, 0].numpy(), x_test, atol=1e-7)
    assert data.y_test.tolist() == y_test.tolist()
    other = load_data(f"imagefolder:{tmp_path}", split_seed=1)
    assert not torch.equal(other.y_test, data.y_test) or not torch.equal(other.x_test, data.x_test)


def test_size_option_colour_and_grey_saved_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("b", "a")):  # class names sorted: a, b
        for kind in ("g", "rgb"):
            (tmp_path / kind / name).mkdir(parents=True)
        for i in range(5):
            grey = rng.integers(0, 256, size=(10, 12), dtype=np.uint8)  # H=10, W=12
            Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "g" / name / f"{i}.png")
            colour = rng.integers(0, 256, size=(10 + c, 12, 3), dtype=np.uint8)
            Image.fromarray(colour).save(tmp_path / "rgb" / name / f"{i}.png")
    # RGB files whose channels are equal are grey; the size is the first image's (H, W).
    grey = load_data(f"imagefolder:{tmp_path / 'g'}?size=10x12")
    assert grey.input_shape == (1, 10, 12) and grey.class_names == ["a", "b"]
    colour = load_data(f"imagefolder:{tmp_path / 'rgb'}")  # first image: a/0.png, 11x12
    assert colour.input_shape == (3, 11, 12) and colour.preprocessing["channels"] == 3
    small = load_data(f"imagefolder:{tmp_path / 'rgb'}?size=4x6")
    assert small.input_shape == (3, 4, 6) and small.name.endswith("?size=4x6")
    assert load_data(f"imagefolder:{tmp_path / 'rgb'}?size=5").input_shape == (3, 5, 5)


def _tree(root: Path, layout: dict[str, int]) -> None:
    """``{"train/a": 2, ...}``: that many small grey PNGs in each folder."""
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("L", (4, 4), 40 * i).save(root / folder / f"{i}.png")


@pytest.mark.parametrize(
    "layout, spec, message",
    [
        ({}, "{root}/nowhere", "imagefolder folder not found"),
        ({"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 0}, "{root}", "holds no images"),
        (
            {"train/a": 2, "train/b": 2, "test/a": 1, "test/c": 1},
            "{root}",
            "b is only in train/; c is only in test/",
        ),  # fmt: skip
        ({"train/a": 2, "train/b": 2}, "{root}", "has train/ but no test/"),
        ({"a": 3}, "{root}", "one class folder (a)"),
        ({"a": 1, "b": 5}, "{root}", "cannot split"),
        ({}, "{root}", "has no class folders"),
        ({"a": 5, "b": 5}, "{root}?size=0", "imagefolder size='0'"),
        ({"a": 5, "b": 5}, "{root}?size=big", "HEIGHTxWIDTH"),
        ({"a": 5, "b": 5}, "{root}?channels=3", "the one option is size"),
        ({"a": 5, "b": 5, "b/sub": 0}, "{root}?size=4", None),  # loads: a deeper folder is fine
        ({}, "", "needs a folder"),
    ],
)
def test_a_malformed_tree_is_one_clear_error(tmp_path, layout, spec, message):
    _tree(tmp_path, layout)
    spec = "imagefolder:" + spec.format(root=tmp_path)
    if message is None:
        assert load_data(spec).num_classes == 2
        return
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_data(spec)
    assert "\n" not in str(err.value)


def test_an_unreadable_training_image_is_named(tmp_path):
    _tree(tmp_path, {"a": 5, "b": 5})
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"b/broken.png is not a readable image"):
        load_data(f"imagefolder:{tmp_path}")


def test_decoding_thousands_of_small_images_is_quick(tmp_path, raw_digits):
    import time

    images, labels = raw_digits
    write_tree(tmp_path, images, labels)  # all 1,797
    start = time.perf_counter()
    data = load_data(f"imagefolder:{tmp_path}")
    assert len(data.y_train) + len(data.y_test) == 1797
    assert time.perf_counter() - start < 15  # ~0.5 s here; generous for a loaded machine


def test_train_connect_evaluate_and_predict_through_the_cli(split_tree, tmp_path, capsys):
    """Endpoints trained on an image folder; the path's ensemble predicts the test folder's
    files exactly as `evaluate` scores the loaded test split."""
    root, _ = split_tree
    spec = f"imagefolder:{root}"
    ends = []
    for seed in (0, 1):
        out = tmp_path / f"e{seed}.safetensors"
        argv = ["train", "--data", spec, "--arg", "width=16", "--epochs", "15", "--seed", str(seed), "--out", str(out)]  # fmt: skip
        assert main(["--quiet", *argv]) == 0
        ends.append(str(out))
    assert "test acc" in capsys.readouterr().out

    from modeconn.checkpoint import load_checkpoint

    assert load_checkpoint(ends[0]).meta["data"] == f"imagefolder:{root.resolve()}?size=8"
    path = tmp_path / "linear"
    argv = ["connect", *ends, "--method", "linear", "--eval-points", "3", "--out", str(path)]
    assert main(["--quiet", *argv]) == 0  # the data: the endpoints' own, reloaded by name
    from modeconn.formats import read_manifest

    assert read_manifest(path).preprocessing["classes"] == NAMES  # exported graphs carry it too
    report = tmp_path / "eval.json"
    argv = ["evaluate", str(path), "--k", "2", "--backend", "torch", "--json", str(report)]
    assert main(["--quiet", *argv]) == 0
    rows = {row["label"]: row for row in json.loads(report.read_text())["linear"]}
    capsys.readouterr()

    csv_file = tmp_path / "preds.csv"
    argv = ["predict", str(path), "--images", str(root / "test"), "--k", "2", "--out", str(csv_file)]  # fmt: skip
    assert main(["--quiet", *argv]) == 0
    out = capsys.readouterr().out
    header = csv_file.read_text().splitlines()[0].split(",")
    assert header == ["file", "label", "true", *(f"p_{n}" for n in NAMES), "entropy", "mutual_information", "disagreement"]  # fmt: skip
    accuracy = rows["path ensemble K=2"]["accuracy"]
    assert f"accuracy {100 * accuracy:.2f}%" in out
    assert f"NLL {rows['path ensemble K=2']['nll']:.4f}" in out
