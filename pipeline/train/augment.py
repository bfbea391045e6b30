"""mmsegmentation's (0.x) training augmentations, as the ZegCLIP release composes them (and knobs for the rest).

Order of the release pipeline (`configs/_base_/datasets/cocostuff_512x512.py`): Resize (img_scale (2048, 512),
ratio_range (0.5, 2.0), keep ratio) -> RandomCrop(512, cat_max_ratio 0.75) -> RandomFlip(0.5) ->
PhotoMetricDistortion -> Normalize -> Pad(512, image 0 after normalisation, labels 255).

Every draw comes from one `numpy.random.Generator` (the decoder's, seeded per rank), in mmseg's order. The
photometric ops work on uint8 RGB arrays [H, W, 3] (mmseg's are BGR; brightness and contrast act on every
channel alike and the HSV conversion below reads RGB, so the result is the same).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CropBox = tuple[int, int, int, int]  # y1, y2, x1, x2


def rescale_size(height: int, width: int, short_target: float, long_target: float | None) -> tuple[int, int]:
    """mmcv `rescale_size` with keep-ratio: factor = min(long_target / long side, short_target / short side).

    Args:
        height, width: input size.
        short_target: the bound on the short side (mmseg: img_scale's short edge · ratio).
        long_target: the bound on the long side (mmseg: img_scale's long edge · ratio); None = no bound.

    Returns:
        (new height, new width), each int(side · factor + 0.5) and at least 1.
    """
    factor = short_target / min(height, width)
    if long_target is not None:
        factor = min(factor, long_target / max(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def random_crop_box(rng: np.random.Generator, height: int, width: int, size: int) -> CropBox:
    """mmseg `RandomCrop.get_crop_bbox`: offsets uniform in [0, margin] per axis (the box may overhang)."""
    top = int(rng.integers(0, max(height - size, 0) + 1))
    left = int(rng.integers(0, max(width - size, 0) + 1))
    return top, top + size, left, left + size


def cat_max_ratio_crop(rng: np.random.Generator, label: np.ndarray, size: int, cat_max_ratio: float,
                       ignore_index: int, tries: int = 10) -> CropBox:
    """mmseg `RandomCrop` with `cat_max_ratio`: redraw the box (up to `tries` times) until the crop holds more
    than one class and no class covers `cat_max_ratio` or more of its labelled (non-ignore) pixels.

    As in mmseg, after `tries` rejected boxes the next draw is used unchecked; `cat_max_ratio >= 1` draws once.

    Args:
        rng: the draw stream.
        label: int [H, W] label map.
        size: crop side.
        cat_max_ratio: the largest allowed share of one class (release: 0.75).
        ignore_index: excluded from the counts.

    Returns:
        (y1, y2, x1, x2); slice `label[y1:y2, x1:x2]`.
    """
    box = random_crop_box(rng, *label.shape, size)
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(tries):
        if crop_is_balanced(label[box[0]:box[1], box[2]:box[3]], cat_max_ratio, ignore_index):
            break
        box = random_crop_box(rng, *label.shape, size)
    return box


def crop_is_balanced(crop: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
    """mmseg's acceptance test: > 1 labelled class and max class count / labelled count < cat_max_ratio."""
    labels, counts = np.unique(crop, return_counts=True)
    counts = counts[labels != ignore_index]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def convert(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg `PhotoMetricDistortion.convert`: uint8(clip(float32(image) · alpha + beta, 0, 255)) (truncating)."""
    return np.clip(image.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """OpenCV 8-bit RGB -> HSV: uint8 [H, W, 3], H in [0, 180) (half degrees), S and V in 0..255, rounded."""
    rgb = image.astype(np.float64)
    value = rgb.max(axis=-1)
    delta = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, delta * 255.0 / np.maximum(value, 1e-12), 0.0)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-12)
    hue = np.where(value == red, 60.0 * (green - blue) / safe,
                   np.where(value == green, 120.0 + 60.0 * (blue - red) / safe, 240.0 + 60.0 * (red - green) / safe))
    hue = np.where(delta > 0, np.mod(hue, 360.0), 0.0)
    hsv = np.stack([np.round(hue / 2.0) % 180, np.round(saturation), value], axis=-1)
    return hsv.astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """OpenCV 8-bit HSV (H in half degrees) -> RGB uint8, rounded."""
    hue = hsv[..., 0].astype(np.float64) * 2.0 / 60.0
    saturation, value = hsv[..., 1].astype(np.float64) / 255.0, hsv[..., 2].astype(np.float64)
    sector = np.floor(hue).astype(np.int64) % 6
    fraction = hue - np.floor(hue)
    p, q, t = value * (1 - saturation), value * (1 - saturation * fraction), value * (1 - saturation * (1 - fraction))
    table = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    rgb = np.zeros(hsv.shape, dtype=np.float64)
    for index, channels in enumerate(table):
        chosen = sector == index
        for channel, source in enumerate(channels):
            rgb[..., channel][chosen] = source[chosen]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """mmseg `PhotoMetricDistortion` on uint8 RGB [H, W, 3]; each op applied with p = 0.5 (a draw of integers(2)).

    Order: brightness (beta ~ U(−32, 32)); mode ~ integers(2), mode 1 = contrast now (alpha ~ U(0.5, 1.5));
    saturation (S channel · U(0.5, 1.5) through HSV); hue (H + integers(−18, 18), exclusive upper bound as numpy's
    randint, modulo 180); mode 0 = contrast last. (mmseg's comment says mode 0 is contrast first; its code does the
    opposite, and the code is what trained the release.)
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        self.brightness_delta, self.contrast_range = brightness_delta, contrast_range
        self.saturation_range, self.hue_delta = saturation_range, hue_delta

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = self._maybe(rng, image, lambda x: convert(x, beta=rng.uniform(-self.brightness_delta,
                                                                               self.brightness_delta)))
        mode = int(rng.integers(2))
        if mode == 1:
            image = self._contrast(image, rng)
        image = self._maybe(rng, image, lambda x: self._saturation(x, rng.uniform(*self.saturation_range)))
        image = self._maybe(rng, image, lambda x: self._hue(x, int(rng.integers(-self.hue_delta, self.hue_delta))))
        if mode == 0:
            image = self._contrast(image, rng)
        return image

    @staticmethod
    def _maybe(rng: np.random.Generator, image: np.ndarray, op: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return op(image) if int(rng.integers(2)) else image

    def _contrast(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._maybe(rng, image, lambda x: convert(x, alpha=rng.uniform(*self.contrast_range)))

    @staticmethod
    def _saturation(image: np.ndarray, alpha: float) -> np.ndarray:
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = convert(hsv[..., 1], alpha=alpha)
        return hsv_to_rgb(hsv)

    @staticmethod
    def _hue(image: np.ndarray, delta: int) -> np.ndarray:
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + delta) % 180
        return hsv_to_rgb(hsv)
