"""Decoding and augmentation of encoded images: pure functions of the bytes (and a generator).

Every file-based source decodes with the same Pillow code and the paper's augmentation
(docs/method.md §9): training images get torchvision's
``RandomResizedCrop(image_size, scale=(min_crop_area, 1), ratio=(3/4, 4/3))`` (with its
fallback to a centre crop after ten rejected draws) and a horizontal flip; evaluation images
are resized (shorter side to ``round(image_size * eval_resize_ratio)``) and centre-cropped.
Resizing is bilinear; the output is RGB, normalised with the ImageNet mean and standard
deviation, float32 NHWC.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_PIXEL_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_PIXEL_OFFSET = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
CROP_RATIO = (3 / 4, 4 / 3)  # random-resized crop: range of aspect ratios (width / height)
# What Pillow raises for a file it cannot read or decode (truncated, corrupt, not an image).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Transform:
    """Output size ``image_size`` (pixels); training crops keep at least ``min_crop_area`` of the
    image's area; evaluation resizes the shorter side to ``eval_resize`` pixels first."""

    image_size: int
    min_crop_area: float
    eval_resize: int

    @classmethod
    def from_config(cls, data_config) -> Transform:
        size = int(data_config.image_size)
        eval_resize = round(size * data_config.eval_resize_ratio)
        if not 0.0 < data_config.min_crop_area <= 1.0:
            raise ValueError(
                f"data.min_crop_area must be in (0, 1], got {data_config.min_crop_area}."
            )
        if eval_resize < size:
            raise ValueError(
                f"data.eval_resize_ratio must be at least 1, got {data_config.eval_resize_ratio}."
            )
        return cls(size, float(data_config.min_crop_area), eval_resize)


def decode_rgb(encoded: bytes) -> Image.Image:
    """Decodes any image Pillow reads and converts it to RGB (as torchvision's loader does)."""
    with Image.open(io.BytesIO(encoded)) as image:
        return image.convert("RGB")


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, min_area: float
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(left, top, crop_width, crop_height)``.

    Ten draws of an area fraction in ``[min_area, 1]`` and a log-uniform aspect ratio in
    ``CROP_RATIO``; the first that fits is placed uniformly. If none fits, a centre crop of the
    whole image, clipped to the ratio range.
    """
    area = width * height
    log_ratio = np.log(CROP_RATIO)
    for _ in range(10):
        target_area = area * rng.uniform(min_area, 1.0)
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` to float32 ``(pixels / 255 - mean) / std`` (ImageNet's)."""
    out = pixels.astype(np.float32)
    out *= _PIXEL_SCALE  # in place: half the time of the formula's temporaries
    out -= _PIXEL_OFFSET
    return out


def train_image(encoded: bytes, rng: np.random.Generator, transform: Transform) -> np.ndarray:
    """Random-resized crop, bilinear resize to ``image_size`` and a random horizontal flip:
    float32 ``(image_size, image_size, 3)``, normalised."""
    image = decode_rgb(encoded)
    left, top, w, h = random_resized_crop_box(*image.size, rng, transform.min_crop_area)
    size = (transform.image_size, transform.image_size)
    crop = image.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(crop)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return normalise(pixels)


def eval_image(encoded: bytes, transform: Transform) -> np.ndarray:
    """Bilinear resize of the shorter side to ``eval_resize`` (torchvision's ``Resize(int)``),
    then a centre crop of ``image_size``: float32 ``(image_size, image_size, 3)``, normalised."""
    image = decode_rgb(encoded)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = transform.eval_resize, int(transform.eval_resize * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    pixels = np.asarray(image.resize(new_size, Image.Resampling.BILINEAR))
    size = transform.image_size
    top = int(round((new_size[1] - size) / 2.0))
    left = int(round((new_size[0] - size) / 2.0))
    return normalise(pixels[top : top + size, left : left + size])
