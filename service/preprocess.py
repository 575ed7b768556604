"""From uploaded image bytes, or raw pixel values, to model inputs, as the training data was made.

The recipe and the pixel pipeline live in :mod:`modeconn.images` (Pillow and numpy, no torch),
shared with ``modeconn predict`` and the ``imagefolder:`` data set, so that an image becomes the
same model input over HTTP as on the command line. Uploads are limited to
:data:`ACCEPTED_FORMATS` and :data:`MAX_PIXELS` pixels.
"""

from __future__ import annotations

from modeconn.images import (
    ACCEPTED_FORMATS,
    MAX_PIXELS,
    check_recipe,
    image_to_input,
    normalize_raw,
)

__all__ = ["ACCEPTED_FORMATS", "MAX_PIXELS", "image_to_input", "normalize_raw", "check_recipe"]
