"""Data loading: the bundled digits, user npz files, torchvision folders, and their errors."""

import numpy as np
import pytest
import torch

from modeconn.data import iterate_batches, load_data


def test_digits_is_a_seeded_stratified_split(digits):
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert len(digits.y_train) + len(digits.y_test) == 1797
    again = load_data("digits")
    assert torch.equal(again.x_train, digits.x_train)
    assert digits.fingerprint() == again.fingerprint()
    # stratified: every class is in the test set in proportion
    counts = torch.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    assert abs(float(digits.x_train.mean())) < 1e-5  # standardised on the training set
    other = load_data("digits", split_seed=1)
    assert not torch.equal(other.y_test, digits.y_test)


def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(20, 3, 4)).astype(np.float32),
        "y_train": rng.integers(0, 3, size=20),
        "x_test": rng.normal(size=(6, 3, 4)).astype(np.float32),
        "y_test": rng.integers(0, 3, size=6),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_any_input_shape(tmp_path):
    data = load_data(_write_npz(tmp_path / "d.npz", y_train=np.arange(20) % 4))
    assert data.input_shape == (3, 4)
    assert data.num_classes == 4
    assert data.y_train.dtype == torch.int64


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"y_test": None}, "lacks y_test"),
        ({"y_train": np.full(20, -1)}, "0..C-1"),
        ({"y_train": np.zeros(19, dtype=int)}, "must have shape"),
        ({"x_train": np.full((20, 3, 4), np.nan, dtype=np.float32)}, "NaN"),
        ({"y_train": np.zeros(20, dtype=np.float32)}, "integer class labels"),
        ({"x_test": np.zeros((6, 5), dtype=np.float32)}, "must match"),
    ],
)
def test_malformed_npz_gives_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_data(_write_npz(tmp_path / "bad.npz", **overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"y_test": np.array([0, 1, 2, 0, 1, 12])}, r"y_test holds labels \[12\] that y_train"),
        ({"y_train": np.arange(20) % 4 * 2}, r"classes \[1, 3, 5\] of 0..6 never occur"),
        (
            {"y_train": np.arange(20) % 3, "num_classes": np.array(2)},
            r"y_train holds labels \[2\] outside 0..1",
        ),
        ({"num_classes": np.array([3, 4])}, "num_classes must be one integer"),
    ],
)
def test_npz_labels_outside_the_classes_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_data(_write_npz(tmp_path / "bad.npz", **overrides))


def test_npz_stray_labels_and_raw_bytes_are_named(tmp_path, caplog):
    y_train = np.concatenate([np.arange(60) % 3, [3]])  # one 3 among 0..2: a stray label
    x_train = np.random.default_rng(0).integers(0, 256, size=(61, 3, 4)).astype(np.uint8)
    with caplog.at_level("WARNING", logger="modeconn"):
        data = load_data(_write_npz(tmp_path / "d.npz", x_train=x_train, y_train=y_train))
    assert data.num_classes == 4
    assert "classes [3] have [1] training examples" in caplog.text
    assert "uint8 values up to" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="modeconn"):
        load_data(_write_npz(tmp_path / "i.npz", x_train=x_train[:20].astype(np.int64)))
    assert "int64 values up to" in caplog.text  # any integer pixels, not only bytes
    declared = _write_npz(
        tmp_path / "e.npz", y_train=y_train, x_train=x_train, num_classes=np.array(3)
    )
    with pytest.raises(ValueError, match=r"labels \[3\] outside 0..2"):
        load_data(declared)


def test_npz_that_is_not_an_npz(tmp_path):
    bad = tmp_path / "junk.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read"):
        load_data(f"npz:{bad}")
    with pytest.raises(ValueError, match="not found"):
        load_data(f"npz:{tmp_path / 'missing.npz'}")


@pytest.mark.parametrize("spec", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_torchvision_sets_need_a_local_folder(tmp_path, spec):
    with pytest.raises(ValueError, match="needs a folder"):
        load_data(spec)
    with pytest.raises(ValueError, match="folder not found") as err:
        load_data(f"{spec}:{tmp_path / 'nope'}")
    assert "{" not in str(err.value)  # every placeholder filled in
    with pytest.raises(ValueError, match="not found or corrupt"):
        load_data(f"{spec}:{tmp_path}")


def test_mnist_reads_local_idx_files(tmp_path):
    """A tiny MNIST in torchvision's raw idx format loads, normalised, with no download."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)

    def idx(path, array, magic):
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        path.write_bytes(header + array.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 2049)
    data = load_data(f"mnist:{tmp_path}")
    assert data.input_shape == (1, 28, 28)
    assert data.num_classes == 10
    assert len(data.y_train) == 12 and len(data.y_test) == 5
    assert data.preprocessing["mean"] == [0.1307]


def test_unknown_data_set_lists_the_known_ones():
    with pytest.raises(ValueError, match="digits, npz:PATH"):
        load_data("imagenet")


def test_iterate_batches_covers_every_example_once():
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    seen = torch.cat(
        [yb for _, yb in iterate_batches(x, y, 3, generator=torch.Generator().manual_seed(0))]
    )
    assert sorted(seen.tolist()) == list(range(10))
    dropped = list(iterate_batches(x, y, 3, shuffle=False, drop_last=True))
    assert [len(yb) for _, yb in dropped] == [3, 3, 3]
