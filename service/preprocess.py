"""From uploaded image bytes, or raw pixel values, to model inputs, as the training data was made.

The recipe is the artifact's ``data.preprocessing`` dict (written by :mod:`modeconn.data`):
``{"kind": "image", "channels": C, "size": [H, W], "raw_max": R, "mean": [...], "std": [...],
"ink": "light-on-dark" | "dark-on-light"}``. An image is decoded with Pillow, flattened onto the
data set's background if it has transparency, converted to C channels, resized to H x W (area
averaging when shrinking, as the digits were made from 32x32 bitmaps by counting 4x4 blocks),
scaled to [0, 1], optionally inverted so that ink matches the training data, and normalised per
channel with ``(x - mean) / std``. Pillow and numpy only: no torch in the serving process.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ACCEPTED_FORMATS", "MAX_PIXELS", "image_to_input", "normalize_raw", "check_recipe"]

#: Image formats an upload may use (Pillow's names).
ACCEPTED_FORMATS = ("PNG", "JPEG")
#: Uploads with more pixels are refused before decoding (a decompression-bomb guard).
MAX_PIXELS = 4096 * 4096


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


def _flatten_alpha(image: Image.Image, background: int) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (background, background, background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image


def image_to_input(
    data: bytes,
    preprocessing: dict,
    input_shape: tuple[int, ...],
    *,
    invert: bool | None = None,
) -> np.ndarray:
    """Decode one PNG/JPEG upload into a model input of shape ``(1, *input_shape)``.

    ``invert=None`` decides from a grayscale picture: when its border is brighter than its
    average the background is light, and the image is inverted if the data set's ink is
    light-on-dark (and conversely); colour pictures are never inverted unless asked.
    ``ValueError`` for anything that is not a readable PNG/JPEG image.
    """
    channels, height, width = check_recipe(preprocessing, input_shape)
    if channels not in (1, 3):
        raise ValueError(f"images can feed 1- or 3-channel models, this one has {channels}")
    if not data:
        raise ValueError("the upload is empty: send a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise ValueError(
                    f"the upload is a {image.format} image; expected one of "
                    f"{', '.join(ACCEPTED_FORMATS)}"
                )
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(
                    f"the image is {image.width}x{image.height}: above {MAX_PIXELS} pixels"
                )
            image.load()
    except ValueError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(
            f"the upload is not a readable image; expected one of {', '.join(ACCEPTED_FORMATS)}"
        ) from None
    except (OSError, SyntaxError, EOFError) as err:  # truncated or corrupt files
        raise ValueError(
            f"the image could not be decoded ({err}); send a valid PNG or JPEG"
        ) from None

    light_ink = preprocessing.get("ink", "light-on-dark") == "light-on-dark"
    image = _flatten_alpha(image, background=0 if light_ink else 255)
    image = image.convert("L" if channels == 1 else "RGB")
    shrinking = image.width >= width and image.height >= height
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    image = image.resize((width, height), resample=resample)
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3) in [0, 1]
    x = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)

    if invert is None and channels != 1:
        invert = False
    if invert is None:
        gray = x.mean(axis=0)  # (H, W)
        border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
        light_background = float(border.mean()) > float(gray.mean())
        invert = light_background == light_ink
    if invert:
        x = 1.0 - x
    mean, std = _stats(preprocessing, channels)
    return ((x - mean) / std).astype(np.float32)[None]  # (1, C, H, W)
