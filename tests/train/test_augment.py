"""mmseg's training augmentations (`pipeline.train.augment`) against hand-computed cases and their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.train.augment import (
    PhotoMetricDistortion,
    cat_max_ratio_crop,
    convert,
    crop_is_balanced,
    hsv_to_rgb,
    random_crop_box,
    rescale_size,
    rgb_to_hsv,
)
from pipeline.train.batches import ImageLabelDecoder
from pipeline.train.configs import AugmentConfig


class Scripted:
    """A stand-in generator that returns queued values and records which draws were asked for."""

    def __init__(self, *values: float) -> None:
        self.values, self.calls = list(values), []

    def integers(self, low: int, high: int | None = None) -> int:
        self.calls.append(("integers", low, high))
        return int(self.values.pop(0))

    def uniform(self, low: float, high: float) -> float:
        self.calls.append(("uniform", low, high))
        return float(self.values.pop(0))


def test_rescale_size_is_mmcv_keep_ratio_rule():
    assert rescale_size(300, 400, 512, 2048) == (512, 683)  # factor min(512/300, 2048/400) = 1.7067
    assert rescale_size(100, 1000, 512, 2048) == (205, 2048)  # the long side binds: factor 2.048
    assert rescale_size(100, 1000, 512, None) == (512, 5120)


def test_crop_balance_excludes_ignore_and_needs_two_classes():
    crop = np.full((4, 4), 255)
    crop[0, 0], crop[0, 1] = 0, 1  # 14 ignore pixels, one pixel each of classes 0 and 1: share 0.5
    assert crop_is_balanced(crop, 0.75, 255)
    assert not crop_is_balanced(np.zeros((4, 4)), 0.75, 255)  # one class only
    crop[0, 2] = 0  # class 0 now holds 2 of 3 labelled pixels: 0.667 < 0.75, but not < 0.6
    assert crop_is_balanced(crop, 0.75, 255) and not crop_is_balanced(crop, 0.6, 255)


def test_cat_max_ratio_crop_takes_the_first_balanced_of_ten_retries():
    label = np.zeros((32, 64), dtype=np.int64)
    label[:, 48:] = 1  # a 32-wide crop is balanced only for left offsets 25..32 (8 of 33)
    outcomes = {"balanced": 0, "fallback": 0}
    for seed in range(60):
        box = cat_max_ratio_crop(np.random.default_rng(seed), label, 32, 0.75, 255)
        replay = np.random.default_rng(seed)
        draws = [random_crop_box(replay, 32, 64, 32) for _ in range(11)]
        balanced = [d for d in draws[:10] if crop_is_balanced(label[d[0]:d[1], d[2]:d[3]], 0.75, 255)]
        assert box == (balanced[0] if balanced else draws[10])
        outcomes["balanced" if balanced else "fallback"] += 1
        if balanced:
            assert 25 <= box[2] <= 32
    assert outcomes["balanced"] > 40  # 1 - (25/33)^10 = 94% of the draws find a balanced crop
    first = random_crop_box(np.random.default_rng(3), 32, 64, 32)
    assert cat_max_ratio_crop(np.random.default_rng(3), label, 32, 1.0, 255) == first  # ratio 1: no retries


def test_convert_truncates_and_clips_like_mmseg():
    image = np.array([[[100, 250, 0]]], dtype=np.uint8)
    assert convert(image, alpha=1.234, beta=10).tolist() == [[[133, 255, 10]]]  # 133.4 -> 133, 318.5 -> 255
    assert convert(image, beta=-20).tolist() == [[[80, 230, 0]]]


def test_hsv_is_opencv_8bit_convention():
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [255, 128, 0]]], dtype=np.uint8)
    assert rgb_to_hsv(colours).tolist() == [[[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128],
                                             [15, 255, 255]]]  # orange: 60·128/255 = 30.1 deg -> 15
    assert hsv_to_rgb(rgb_to_hsv(colours[:, :4])).tolist() == colours[:, :4].tolist()


def test_photometric_order_and_values_follow_mmseg_code():
    pixel = np.array([[[200, 90, 90]]], dtype=np.uint8)
    distortion = PhotoMetricDistortion()
    # brightness off (0); mode 1 -> contrast first (apply, alpha 1.5); saturation on (0.5); hue off (0).
    rng = Scripted(0, 1, 1, 1.5, 1, 0.5, 0)
    # contrast: (300 -> 255, 135, 135); saturation: S = 120 -> 60, V = 255: p = 255 · (1 - 60/255) = 195
    assert distortion(pixel, rng).tolist() == [[[255, 195, 195]]]
    assert rng.calls == [("integers", 2, None), ("integers", 2, None), ("integers", 2, None), ("uniform", 0.5, 1.5),
                         ("integers", 2, None), ("uniform", 0.5, 1.5), ("integers", 2, None)]
    # mode 0 -> contrast last: saturation of (200, 90, 90): S = round(110·255/200) = 140 -> 70,
    # p = 200 · (1 - 70/255) = 145.1 -> (200, 145, 145); contrast 1.5 -> (255, 217, 217)
    rng = Scripted(0, 0, 1, 0.5, 0, 1, 1.5)
    assert distortion(pixel, rng).tolist() == [[[255, 217, 217]]]
    # brightness on (+10 on every channel: (255, 10, 10)), hue on (+60 half-degrees: red -> green), rest off
    rng = Scripted(1, 10.0, 0, 0, 1, 60, 0)
    assert distortion(np.array([[[245, 0, 0]]], dtype=np.uint8), rng).tolist() == [[[10, 255, 10]]]
    assert ("integers", -18, 18) in rng.calls and ("uniform", -32, 32) in rng.calls


def test_decoder_pads_bottom_right_with_pad_value_and_ignore():
    augment = AugmentConfig(min_scale=1.0, max_scale=1.0, long_side_factor=1.0, flip_prob=0.0)
    decoder = ImageLabelDecoder(16, "label.png", 255, seed=0, augment=augment, pad_rgb=(0.5, 0.25, 0.0))
    image = np.full((8, 16, 3), 255, dtype=np.uint8)  # short bound 16 -> x2, long bound 16 -> x1: stays 8 x 16
    pixels, labels = decoder.augment(image, np.ones((8, 16), dtype=np.int64))
    assert pixels.shape == (3, 16, 16) and labels.shape == (16, 16)
    assert torch.all(pixels[:, :8] == 1.0) and torch.all(labels[:8] == 1)
    assert pixels[:, 8:, 0].flatten(1).mean(1).tolist() == [0.5, 0.25, 0.0] and torch.all(labels[8:] == 255)


@pytest.mark.parametrize("photometric", [False, True])
def test_decoder_crops_have_the_crop_size_and_keep_labels_aligned(photometric):
    augment = AugmentConfig(min_scale=0.5, max_scale=2.0, long_side_factor=4.0, cat_max_ratio=0.75,
                            photometric=photometric)
    decoder = ImageLabelDecoder(16, "label.png", 255, seed=1, augment=augment)
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[:, 15:] = 255
    label = np.zeros((20, 30), dtype=np.int64)
    label[:, 15:] = 1
    for _ in range(5):
        pixels, labels = decoder.augment(image, label)
        assert pixels.shape == (3, 16, 16)
        if not photometric:  # white pixels are exactly the class-1 pixels (nearest labels, bilinear image)
            white, grey = pixels[0] == 1.0, pixels[0] == 0.0
            assert torch.all(labels[white] == 1) and torch.all(labels[grey & (labels != 255)] == 0)
