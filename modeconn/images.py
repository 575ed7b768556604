"""Images to model inputs, made as the training data was: decoding, the preprocessing recipe,
and folders of image files.

One definition shared by the HTTP service (``service/preprocess.py`` re-exports it), ``modeconn
predict`` and the ``imagefolder:`` data set, so that a picture becomes the same model input in
every one of them. Pillow and numpy only: no torch, so the serving process can import it.

The recipe is a data set's ``preprocessing`` dict (written by :mod:`modeconn.data`, stored in
artifacts and exported graphs): ``{"kind": "image", "channels": C, "size": [H, W], "raw_max": R,
"mean": [...], "std": [...], "ink": ..., "classes": [...]}`` (``classes``, the class names, only
where the data set has them). An image is decoded with Pillow, flattened onto the data set's
background if it has transparency, converted to C channels, resized to H x W (area averaging
when shrinking, as the digits were made from 32x32 bitmaps by counting 4x4 blocks), scaled to
[0, 1], optionally inverted so that ink matches the training data, and normalised per channel
with ``(x - mean) / std``.

``ink`` says how a grayscale picture relates to the training data: ``"light-on-dark"`` (digits,
MNIST) and ``"dark-on-light"`` pictures are inverted when their background says they are drawn
the other way round; ``"photo"`` and ``"as-is"`` (image folders: used exactly as they are) never
are. Colour pictures are inverted only when asked.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ACCEPTED_FORMATS",
    "MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "check_recipe",
    "normalize_raw",
    "class_names",
    "decode_image",
    "read_image",
    "is_color",
    "to_pixels",
    "prepare_image",
    "image_to_input",
    "find_images",
    "class_folders",
    "FolderListing",
    "list_folder",
]

#: Image formats an HTTP upload may use (Pillow's names).
ACCEPTED_FORMATS = ("PNG", "JPEG")
#: Images with more pixels are refused before decoding (a decompression-bomb guard).
MAX_PIXELS = 4096 * 4096
#: File suffixes read as images from a folder (any format Pillow decodes from them).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Inks whose grayscale pictures are inverted automatically when drawn the other way round.
_INVERTIBLE_INKS = ("light-on-dark", "dark-on-light")
#: Pillow modes without colour.
_GRAY_MODES = ("1", "L", "LA", "La", "I", "F")


# ---------------------------------------------------------------------------------------------
# The recipe


def check_recipe(preprocessing: dict, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(channels, height, width)`` of an image recipe that fits ``input_shape``.

    ``ValueError`` when the path was not trained on images (or the recipe is incomplete).
    """
    if preprocessing.get("kind") != "image":
        raise ValueError(
            "this path was not trained on images (its preprocessing is "
            f"{preprocessing.get('kind', 'unknown')!r}): send model inputs to /predict instead"
        )
    try:
        channels = int(preprocessing["channels"])
        height, width = (int(s) for s in preprocessing["size"])
        mean = [float(m) for m in preprocessing["mean"]]
        std = [float(s) for s in preprocessing["std"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"this path's image preprocessing is incomplete ({err!r})") from err
    if tuple(input_shape) != (channels, height, width):
        raise ValueError(
            f"this path's preprocessing makes {channels}x{height}x{width} images but the model "
            f"takes {list(input_shape)}"
        )
    if len(mean) not in (1, channels) or len(std) not in (1, channels) or min(std) <= 0:
        raise ValueError("this path's image preprocessing has invalid mean/std")
    return channels, height, width


def _stats(preprocessing: dict, channels: int) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array(preprocessing["mean"], dtype=np.float32).reshape(-1, 1, 1)  # (C|1, 1, 1)
    std = np.array(preprocessing["std"], dtype=np.float32).reshape(-1, 1, 1)
    return np.broadcast_to(mean, (channels, 1, 1)), np.broadcast_to(std, (channels, 1, 1))


def normalize_raw(x: np.ndarray, preprocessing: dict, input_shape: tuple[int, ...]) -> np.ndarray:
    """Raw pixel values ``(N, *input_shape)`` in ``[0, raw_max]`` -> normalised model inputs."""
    channels, _, _ = check_recipe(preprocessing, input_shape)
    raw_max = float(preprocessing.get("raw_max", 255.0))
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > raw_max:
        raise ValueError(
            f"raw inputs must lie in [0, {raw_max:g}] (raw pixel values of this path's data), "
            f"got values in [{low:g}, {high:g}]"
        )
    mean, std = _stats(preprocessing, channels)
    return ((x / raw_max - mean) / std).astype(np.float32)  # (N, C, H, W)


def class_names(preprocessing: dict, num_classes: int) -> list[str]:
    """The class names a recipe records (``"classes"``), else ``"0"`` .. ``"C-1"``."""
    names = preprocessing.get("classes")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(name) for name in names]
    return [str(i) for i in range(num_classes)]


# ---------------------------------------------------------------------------------------------
# One image


def decode_image(
    data: bytes, *, formats: Sequence[str] | None = ACCEPTED_FORMATS, name: str | None = None
) -> Image.Image:
    """Decode an image's bytes (fully loaded), refusing more than :data:`MAX_PIXELS` pixels.

    ``formats``: the Pillow formats accepted (None: any that Pillow reads). ``name`` names the
    image in messages (a file); without it they speak of an upload. ``ValueError`` for anything
    that is not a readable image of those formats.
    """
    what, picture = name or "the upload", name or "the image"
    expected = f"; expected one of {', '.join(formats)}" if formats else ""
    if not data:
        raise ValueError(f"{what} is empty" + ("" if name else ": send a PNG or JPEG image"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if formats and image.format not in formats:
                raise ValueError(f"{what} is a {image.format} image{expected}")
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(
                    f"{picture} is {image.width}x{image.height}: above {MAX_PIXELS} pixels"
                )
            image.load()
    except ValueError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{what} is not a readable image{expected}") from None
    except (OSError, SyntaxError, EOFError) as err:  # truncated or corrupt files
        fix = "" if name else "; send a valid PNG or JPEG"
        raise ValueError(f"{picture} could not be decoded ({err}){fix}") from None
    return image


def read_image(path: str | os.PathLike, *, name: str | None = None) -> Image.Image:
    """The image in a file, of any format Pillow reads; ``ValueError`` naming the file if it
    cannot be read or decoded."""
    name = name or str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {name}: {err.strerror or err}") from None
    return decode_image(data, formats=None, name=name)


def is_color(image: Image.Image) -> bool:
    """Whether an image has colour: an RGB picture whose three channels are equal has none."""
    if image.mode in _GRAY_MODES or image.mode.startswith("I;"):
        return False
    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    return not (
        np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    )


def _flatten_alpha(image: Image.Image, background: int) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (background, background, background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image


def _background(preprocessing: dict) -> int:
    """The grey level transparency is flattened onto: the data set's ground (black for light ink)."""
    return 0 if preprocessing.get("ink", "light-on-dark") == "light-on-dark" else 255


def to_pixels(
    image: Image.Image, channels: int, size: tuple[int, int], *, background: int = 255
) -> np.ndarray:
    """``(C, H, W)`` float32 pixels in [0, 1]: transparency flattened onto ``background``,
    converted to 1 or 3 channels, resized to ``size = (H, W)`` (box filter when shrinking,
    bilinear otherwise)."""
    if channels not in (1, 3):
        raise ValueError(f"images can feed 1- or 3-channel models, this one has {channels}")
    height, width = size
    image = _flatten_alpha(image, background)
    image = image.convert("L" if channels == 1 else "RGB")
    shrinking = image.width >= width and image.height >= height
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    image = image.resize((width, height), resample=resample)
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3) in [0, 1]
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)


def prepare_image(
    image: Image.Image,
    preprocessing: dict,
    input_shape: tuple[int, ...],
    *,
    invert: bool | None = None,
) -> np.ndarray:
    """A decoded image as a model input of shape ``(1, *input_shape)``, made by the recipe.

    ``invert=None`` decides from a grayscale picture when the data set has ink (see the module
    doc): when its border is brighter than its average the background is light, and the image
    is inverted if the data set's ink is light-on-dark (and conversely); colour pictures, and
    data sets without ink, are never inverted unless asked.
    """
    channels, height, width = check_recipe(preprocessing, input_shape)
    x = to_pixels(image, channels, (height, width), background=_background(preprocessing))
    ink = preprocessing.get("ink", "light-on-dark")
    if invert is None and (channels != 1 or ink not in _INVERTIBLE_INKS):
        invert = False
    if invert is None:
        gray = x.mean(axis=0)  # (H, W)
        border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
        light_background = float(border.mean()) > float(gray.mean())
        invert = light_background == (ink == "light-on-dark")
    if invert:
        x = 1.0 - x
    mean, std = _stats(preprocessing, channels)
    return ((x - mean) / std).astype(np.float32)[None]  # (1, C, H, W)


def image_to_input(
    data: bytes,
    preprocessing: dict,
    input_shape: tuple[int, ...],
    *,
    invert: bool | None = None,
    formats: Sequence[str] | None = ACCEPTED_FORMATS,
) -> np.ndarray:
    """Decode one PNG/JPEG upload into a model input of shape ``(1, *input_shape)``.

    ``ValueError`` for anything that is not a readable image of ``formats``; ``invert`` as in
    :func:`prepare_image`.
    """
    channels, _, _ = check_recipe(preprocessing, input_shape)
    if channels not in (1, 3):
        raise ValueError(f"images can feed 1- or 3-channel models, this one has {channels}")
    image = decode_image(data, formats=formats)
    return prepare_image(image, preprocessing, input_shape, invert=invert)


# ---------------------------------------------------------------------------------------------
# Folders of images


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (by :data:`IMAGE_SUFFIXES`) under ``folder``, at any depth, sorted; hidden
    files and folders are skipped, and so is everything else. Linked folders are followed, as
    torchvision's ``ImageFolder`` does."""
    found, seen = [], set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:  # a link back up the tree: walk each folder once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            Path(current, f)
            for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


def class_folders(root: str | os.PathLike) -> dict[str, list[Path]]:
    """The ImageFolder layout of ``root``: class name (a subfolder, sorted) -> its image files.

    ``ValueError`` when ``root`` has no class folders or a class folder holds no image.
    """
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(
            f"{root} has no class folders: put each class's images in a subfolder named after "
            "the class"
        )
    classes = {folder.name: find_images(folder) for folder in folders}
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise ValueError(
            f"class folder {root / empty[0]} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            + (f"; so do {', '.join(empty[1:4])}" if len(empty) > 1 else "")
        )
    return classes


@dataclass(frozen=True)
class FolderListing:
    """The images of a folder to predict and, for an ImageFolder tree, their classes."""

    root: Path
    files: tuple[Path, ...]  # sorted
    labels: tuple[int, ...] | None  # class index per file; None when the folder is not labelled

    @property
    def names(self) -> list[str]:
        """Each file's path relative to the root, with forward slashes."""
        return [file.relative_to(self.root).as_posix() for file in self.files]


def list_folder(folder: str | os.PathLike, classes: Sequence[str]) -> FolderListing:
    """Every image under ``folder``; labelled when the folder is an ImageFolder tree of
    ``classes``: no image directly inside it, and every subfolder that holds images named
    after a class (a subset of the classes is fine).

    Subfolders none of which is a class are just folders of images. ``ValueError`` when some
    subfolders are classes and others are not (a misspelt class), and when there is no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    files = find_images(root)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
    parts = [file.relative_to(root).parts for file in files]
    tops = {p[0] for p in parts if len(p) > 1}  # subfolders that hold images
    loose = any(len(p) == 1 for p in parts)  # images directly in the folder
    index = {name: i for i, name in enumerate(classes)}
    known = sorted(tops & index.keys())
    if loose or not known:
        return FolderListing(root, tuple(files), None)
    unknown = sorted(tops - index.keys())
    if unknown:
        raise ValueError(
            f"{root} mixes class folders ({', '.join(known[:3])}) with folders that name no "
            f"class of this model ({', '.join(unknown[:5])}; its classes: "
            f"{', '.join(classes[:20])}); rename or move them"
        )
    labels = tuple(index[file.relative_to(root).parts[0]] for file in files)
    return FolderListing(root, tuple(files), labels)
