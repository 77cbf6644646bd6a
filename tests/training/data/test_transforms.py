"""Tests of the decoding and augmentation of encoded images."""

import io

import numpy as np
from PIL import Image

from oscqat_jax.training.data import transforms

IMAGE_SIZE = 8


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def test_crop_box_falls_back_to_a_centre_crop_clipped_to_the_ratio_range():
    # A 100x10 strip: every full-area draw with ratio <= 4/3 is taller than 10 pixels.
    box = transforms.random_resized_crop_box(100, 10, np.random.default_rng(0), min_area=1.0)
    assert box == (43, 0, 13, 10)  # width round(10 * 4/3) = 13, centred: (100 - 13) // 2
    box = transforms.random_resized_crop_box(10, 100, np.random.default_rng(0), min_area=1.0)
    assert box == (0, 43, 10, 13)  # height round(10 / (3/4)) = 13, centred: (100 - 13) // 2


def test_crop_boxes_fit_and_respect_the_area_and_ratio_ranges():
    rng = np.random.default_rng(1)
    for _ in range(200):
        left, top, w, h = transforms.random_resized_crop_box(60, 45, rng, min_area=0.08)
        assert 0 <= left and left + w <= 60 and 0 <= top and top + h <= 45
        assert 0.08 * 60 * 45 * 0.8 <= w * h <= 60 * 45
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15


def test_uniform_images_normalise_to_the_imagenet_statistics():
    colour = np.array([200, 30, 120], np.uint8)
    encoded = _encode(np.broadcast_to(colour, (13, 29, 3)).copy(), "PNG")
    transform = transforms.Transform(image_size=IMAGE_SIZE, min_crop_area=0.08, eval_resize=9)
    expected = (colour / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    for image in (
        transforms.eval_image(encoded, transform),
        transforms.train_image(encoded, np.random.default_rng(0), transform),
    ):
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.float32
        np.testing.assert_allclose(image, np.broadcast_to(expected, image.shape), atol=1e-5)


def test_eval_image_resizes_the_shorter_side_then_centre_crops():
    # A 40x12 image: the shorter side 12 -> 9, the longer 40 -> int(9 * 40 / 12) = 30; the
    # crop takes columns from round(22 / 2) = 11 and rows from round(1 / 2) = 0 (Python's
    # rounding, as torchvision's CenterCrop).
    pixels = np.random.default_rng(0).integers(0, 256, (12, 40, 3), dtype=np.uint8)
    transform = transforms.Transform(image_size=IMAGE_SIZE, min_crop_area=0.08, eval_resize=9)
    resized = np.asarray(Image.fromarray(pixels).resize((30, 9), Image.Resampling.BILINEAR))
    expected = transforms.normalise(resized[0:8, 11:19])
    np.testing.assert_array_equal(
        transforms.eval_image(_encode(pixels, "PNG"), transform), expected
    )
