"""Data sets, chosen by a spec string (``--data``).

* ``digits`` (default): scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten
  digits), seeded stratified 80/20 train/test split; nothing is downloaded.
* ``npz:PATH``: a user's file with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (any input
  shape, integer labels 0..C-1), used as given.
* ``mnist:DIR``, ``fashion-mnist:DIR``, ``cifar10:DIR``, ``cifar100:DIR``: torchvision data sets
  read from a local folder (``download=False``), with the usual normalisation, and random crop +
  flip augmentation on the CIFAR training sets.
* ``imagefolder:DIR`` or ``imagefolder:DIR?size=28`` (``size=HxW`` for other shapes): image
  files in torchvision's ImageFolder layout, one subfolder per class (class names: the folder
  names, sorted). ``DIR/train`` and ``DIR/test`` if both exist, else the class folders directly
  under ``DIR``, split 80/20 by class with the seeded split of ``digits``. Every image is
  decoded once, resized to ``size`` (default: the first image's, in sorted order), scaled to
  [0, 1] and used as it is (no normalisation, no inversion); grayscale unless some image has
  colour; an unreadable image is an error that names it. The pixel pipeline is
  :mod:`modeconn.images`, so ``modeconn predict`` and the service turn the same files into the
  same inputs.

Everything is held in memory as tensors: the data sets here are small enough, and mini-batches
then cost one index operation instead of a DataLoader round trip.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor

from modeconn.types import Batch

log = logging.getLogger("modeconn")

__all__ = ["Dataset", "load_data", "iterate_batches", "DATA_KINDS", "DEFAULT_DATA"]

DEFAULT_DATA = "digits"
DATA_KINDS = (
    "digits",
    "npz:PATH",
    "mnist:DIR",
    "fashion-mnist:DIR",
    "cifar10:DIR",
    "cifar100:DIR",
    "imagefolder:DIR",
)

# (batch, generator or None for the global RNG) -> augmented batch.
Augment = Callable[[Tensor, torch.Generator | None], Tensor]


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors plus what a consumer needs to preprocess raw inputs the same way."""

    name: str
    x_train: Tensor  # (N, *input_shape) float32, preprocessed
    y_train: Tensor  # (N,) int64
    x_test: Tensor  # (M, *input_shape)
    y_test: Tensor  # (M,)
    num_classes: int
    #: How raw inputs become model inputs, for services and exported models (JSON-serialisable).
    preprocessing: dict = field(default_factory=dict)
    augment: Augment | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def class_names(self) -> list[str]:
        """The classes' names: an image folder's folder names, else ``"0"`` .. ``"C-1"``."""
        from modeconn.images import class_names

        return class_names(self.preprocessing, self.num_classes)

    def fingerprint(self) -> str:
        """A short hash of the tensors, recorded in artifacts to catch a change of data."""
        digest = hashlib.sha256()
        for tensor in (self.x_train, self.y_train, self.x_test, self.y_test):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise ValueError(f"unknown split {name!r}; expected 'train' or 'test'")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "train_size": len(self.y_train),
            "test_size": len(self.y_test),
            "fingerprint": self.fingerprint(),
            "preprocessing": self.preprocessing,
        }


def iterate_batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    augment: Augment | None = None,
    drop_last: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[Batch]:
    """One pass over ``(x, y)`` in mini-batches, shuffled with ``generator`` when asked."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(y)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for begin in range(0, stop, batch_size):
        idx = order[begin : begin + batch_size]
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(xb, generator)
        yield xb.to(device), yb.to(device)


# ---------------------------------------------------------------------------------------------
# Loaders


def load_data(spec: str = DEFAULT_DATA, *, split_seed: int = 0) -> Dataset:
    """Load the data set named by ``spec`` (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits":
        if arg:
            raise ValueError(f"'digits' takes no argument, got {spec!r}")
        return _load_digits(split_seed)
    if kind == "npz":
        return _load_npz(_require_arg(spec, arg, "a file path"))
    if kind in _TORCHVISION:
        return _load_torchvision(kind, _require_arg(spec, arg, "a folder"))
    if kind == "imagefolder":
        return _load_imagefolder(_require_arg(spec, arg, "a folder"), split_seed)
    raise ValueError(f"unknown data set {spec!r}; expected one of: {', '.join(DATA_KINDS)}")


def _require_arg(spec: str, arg: str, what: str) -> str:
    if not arg:
        kind = spec.split(":")[0]
        raise ValueError(f"data set {spec!r} needs {what}: write it as '{kind}:PATH'")
    return arg


def _split(x: np.ndarray, y: np.ndarray, split_seed: int) -> list[np.ndarray]:
    """``x_train, x_test, y_train, y_test``: a seeded, stratified 80/20 split."""
    from sklearn.model_selection import train_test_split

    return cast(
        list[np.ndarray],  # arrays in, arrays out
        train_test_split(x, y, test_size=0.2, random_state=split_seed, stratify=y),
    )


def _load_digits(split_seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.utils import Bunch

    digits = cast(Bunch, load_digits())  # a Bunch, as return_X_y is False
    x = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = _split(x, y, split_seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(x_tr).unsqueeze(1),  # (N, 1, 8, 8)
        y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy(x_te).unsqueeze(1),
        y_test=torch.from_numpy(y_te),
        num_classes=10,
        preprocessing={
            "kind": "image",
            "channels": 1,
            "size": [8, 8],
            "raw_max": 16.0,
            "mean": [mean],
            "std": [std],
            "ink": "light-on-dark",
        },
    )


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_npz(path_str: str) -> Dataset:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ValueError(f"npz data file not found: {path}")
    try:
        # allow_pickle=False: an npz holding object arrays is refused, never unpickled.
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in _NPZ_KEYS if key not in archive.files]
            if missing:
                raise ValueError(
                    f"{path} lacks {', '.join(missing)}; expected arrays {', '.join(_NPZ_KEYS)} "
                    f"(found {', '.join(archive.files) or 'none'})"
                )
            arrays = {key: archive[key] for key in _NPZ_KEYS}
            declared = archive["num_classes"] if "num_classes" in archive.files else None
    except ValueError as err:
        if "lacks" in str(err):
            raise
        raise ValueError(f"cannot read {path} as an npz of numeric arrays: {err}") from err
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read {path} as an npz file: {err}") from err

    x_tr, y_tr, x_te, y_te = (arrays[key] for key in _NPZ_KEYS)
    for xname, x, yname, y in (
        ("x_train", x_tr, "y_train", y_tr),
        ("x_test", x_te, "y_test", y_te),
    ):
        if x.ndim < 2:
            raise ValueError(f"{path}: {xname} must have shape (N, *input_shape), got {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"{path}: {yname} must have shape ({len(x)},) to match {xname}, got {y.shape}"
            )
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{path}: {xname} must be numeric, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError(f"{path}: {xname} contains NaN or infinite values")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: {yname} must hold integer class labels, got dtype {y.dtype}")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(
            f"{path}: x_train inputs have shape {x_tr.shape[1:]}, x_test {x_te.shape[1:]}; "
            "they must match"
        )
    if len(y_tr) == 0:
        raise ValueError(f"{path}: x_train is empty")
    num_classes = _npz_classes(path, y_tr, y_te, declared)
    if np.issubdtype(x_tr.dtype, np.integer) and int(x_tr.max(initial=0)) > 1:
        log.warning(
            "%s: x_train holds %s values up to %d, used as they are; networks usually train "
            "on values scaled to [0, 1] (store x / 255 as float32)",
            path,
            x_tr.dtype,
            int(x_tr.max()),
        )
    return Dataset(
        name=f"npz:{path}",
        x_train=torch.from_numpy(x_tr.astype(np.float32)),
        y_train=torch.from_numpy(y_tr.astype(np.int64)),
        x_test=torch.from_numpy(x_te.astype(np.float32)),
        y_test=torch.from_numpy(y_te.astype(np.int64)),
        num_classes=num_classes,
        preprocessing={"kind": "array", "note": "inputs are used as given in the npz file"},
    )


def _npz_classes(path: Path, y_tr: np.ndarray, y_te: np.ndarray, declared) -> int:
    """The class count C of an npz: its ``num_classes`` if stored, else ``max(y_train) + 1``.

    Labels must lie in 0..C-1, every class must occur in ``y_train``, and ``y_test`` may only use
    classes ``y_train`` has; a class far rarer than the others is named in a warning (a stray
    label, such as one 10 among digits 0..9, would silently add a class).
    """
    low = int(min(y_tr.min(initial=0), y_te.min(initial=0)))
    if low < 0:
        raise ValueError(f"{path}: labels must lie in 0..C-1, found {low}")
    if declared is not None:
        if declared.shape != () or not np.issubdtype(declared.dtype, np.integer) or declared < 2:
            raise ValueError(f"{path}: num_classes must be one integer >= 2, got {declared!r}")
        classes = int(declared)
        for name, y in (("y_train", y_tr), ("y_test", y_te)):
            beyond = sorted({int(v) for v in y[y >= classes]})
            if beyond:
                raise ValueError(
                    f"{path}: {name} holds labels {beyond[:5]} outside 0..{classes - 1} "
                    f"(num_classes={classes})"
                )
    else:
        classes = int(y_tr.max()) + 1
        beyond = sorted({int(v) for v in y_te[y_te >= classes]})
        if beyond:
            raise ValueError(
                f"{path}: y_test holds labels {beyond[:5]} that y_train never uses (its labels "
                f"are 0..{classes - 1}); fix them, or store num_classes in the npz"
            )
    counts = np.bincount(y_tr, minlength=classes)  # (C,)
    absent = [c for c in range(classes) if counts[c] == 0]
    if absent:
        raise ValueError(
            f"{path}: classes {absent[:5]} of 0..{classes - 1} never occur in y_train; labels "
            "must be 0..C-1 with every class present"
        )
    rare = [c for c in range(classes) if counts[c] * 10 < np.median(counts)]
    if rare:
        log.warning(
            "%s: classes %s have %s training examples against a median of %d per class: stray "
            "labels? (store num_classes in the npz to refuse labels beyond it)",
            path,
            rare[:5],
            [int(counts[c]) for c in rare[:5]],
            int(np.median(counts)),
        )
    return classes


def _imagefolder_spec(arg: str) -> tuple[Path, tuple[int, int] | None]:
    """``DIR`` or ``DIR?size=28`` / ``DIR?size=HxW`` -> (folder, (H, W) or None)."""
    path, sep, query = arg.rpartition("?")
    if not sep or "=" not in query:  # a "?" that starts no option belongs to the path
        path, query = arg, ""
    size = None
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key.strip() != "size":
            raise ValueError(
                f"imagefolder option {item!r} is unknown; the one option is size "
                "(imagefolder:DIR?size=28, or ?size=HxW)"
            )
        dims = value.strip().lower().split("x")
        if len(dims) not in (1, 2) or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(
                f"imagefolder size={value!r}: expected a positive integer (size=28) or "
                "HEIGHTxWIDTH (size=32x24)"
            )
        size = (int(dims[0]), int(dims[-1]))
    return Path(path).expanduser(), size


def _load_imagefolder(arg: str, split_seed: int) -> Dataset:
    from modeconn.images import class_folders, is_color, read_image, to_pixels

    folder, size = _imagefolder_spec(arg)
    if not folder.is_dir():
        raise ValueError(
            f"imagefolder folder not found: {folder} (expected one subfolder of images per "
            "class, or train/ and test/ folders laid out so)"
        )
    root = folder.resolve()
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        have, lack = ("train", "test") if train_dir.is_dir() else ("test", "train")
        raise ValueError(
            f"{root} has {have}/ but no {lack}/: give both, each with one folder per class, "
            "or put the class folders directly in it to have them split 80/20"
        )
    presplit = train_dir.is_dir()
    train = class_folders(train_dir if presplit else root)
    test = class_folders(test_dir) if presplit else {}
    if presplit and train.keys() != test.keys():
        only_train, only_test = (
            sorted(train.keys() - test.keys()),
            sorted(test.keys() - train.keys()),
        )
        raise ValueError(
            f"{root}: train/ and test/ must hold the same class folders, but "
            + "; ".join(
                f"{', '.join(names[:5])} {'are' if len(names) > 1 else 'is'} only in {where}/"
                for names, where in ((only_train, "train"), (only_test, "test"))
                if names
            )
        )
    classes = sorted(train)
    if len(classes) < 2:
        raise ValueError(f"{root} has one class folder ({classes[0]}); a classifier needs two")

    start = time.perf_counter()
    # (file, class index), train first; every file is decoded once and kept until all are seen,
    # since one colour image makes the whole set RGB.
    files = [
        (f, c)
        for split in (train, test)
        for c, name in enumerate(classes)
        for f in split.get(name, [])
    ]
    pictures = [read_image(f, name=str(f)) for f, _ in files]
    channels = 3 if any(is_color(p) for p in pictures) else 1
    height, width = size or (pictures[0].height, pictures[0].width)
    x = np.stack(
        [to_pixels(p, channels, (height, width), background=255) for p in pictures]
    )  # (N, C, H, W) in [0, 1]
    del pictures
    y = np.array([c for _, c in files], dtype=np.int64)  # (N,)
    if presplit:
        n_train = sum(len(v) for v in train.values())
        x_tr, x_te, y_tr, y_te = x[:n_train], x[n_train:], y[:n_train], y[n_train:]
    else:
        try:
            x_tr, x_te, y_tr, y_te = _split(x, y, split_seed)
        except ValueError as err:  # too few images per class for a stratified split
            raise ValueError(
                f"cannot split {root} 80/20 by class ({err}); add images, or give train/ and "
                "test/ folders"
            ) from None
    log.info(
        "imagefolder %s: %d train and %d test images of %d classes, %dx%dx%d, in %.1fs",
        root,
        len(y_tr),
        len(y_te),
        len(classes),
        channels,
        height,
        width,
        time.perf_counter() - start,
    )
    shape = f"{height}" if height == width else f"{height}x{width}"
    return Dataset(
        name=f"imagefolder:{root}?size={shape}",  # reloads the same tensors, wherever run from
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        num_classes=len(classes),
        preprocessing={
            "kind": "image",
            "channels": channels,
            "size": [height, width],
            "raw_max": 255.0,
            "mean": [0.0] * channels,
            "std": [1.0] * channels,
            "ink": "as-is",  # used as they are: predict and the service never invert them
            "classes": classes,
        },
    )


# name -> (torchvision class, mean per channel, std per channel, augment)
_TORCHVISION = {
    "mnist": ("MNIST", (0.1307,), (0.3081,), False),
    "fashion-mnist": ("FashionMNIST", (0.2860,), (0.3530,), False),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
}


def _load_torchvision(kind: str, root_str: str) -> Dataset:
    import torchvision

    cls_name, mean, std, augment = _TORCHVISION[kind]
    root = Path(root_str).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"{kind} folder not found: {root}. Nothing is downloaded here: put the {cls_name} "
            f"files there first (as torchvision's datasets.{cls_name}(root, download=True) would)"
        )
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as err:
        raise ValueError(
            f"{kind} not found or corrupt in {root}: {err} (expected the files torchvision's "
            f"datasets.{cls_name} reads)"
        ) from err

    def tensors(ds) -> tuple[Tensor, Tensor]:
        data = torch.as_tensor(np.asarray(ds.data)).float() / 255.0
        data = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W)
        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        return ((data - m) / s).contiguous(), torch.as_tensor(np.asarray(ds.targets)).long()

    x_tr, y_tr = tensors(train)
    x_te, y_te = tensors(test)
    return Dataset(
        name=f"{kind}:{root}",
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        num_classes=len(train.classes),
        preprocessing={
            "kind": "image",
            "channels": len(mean),
            "size": list(x_tr.shape[2:]),
            "raw_max": 255.0,
            "mean": list(mean),
            "std": list(std),
            # MNIST and Fashion-MNIST draw light objects on a dark ground; CIFAR has no "ink".
            "ink": "light-on-dark" if kind in ("mnist", "fashion-mnist") else "photo",
        },
        augment=_crop_flip if augment else None,
    )


def _crop_flip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Random 4-pixel-padded crop and horizontal flip, per image (the CIFAR standard)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))  # (N, C, H+8, W+8)
    dy = torch.randint(0, 9, (n,), generator=generator).tolist()
    dx = torch.randint(0, 9, (n,), generator=generator).tolist()
    cropped = torch.stack(
        [padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)]
    )  # (N, C, H, W)
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped
