"""Turn HxWx3 uint8 numpy images into normalised float tensors for CLIP / DINOv2."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """[3, H, W] uint8 tensor of an HxWx3 uint8 image; read-only arrays (decoded records) are copied, not aliased."""
    array = np.ascontiguousarray(image) if image.flags.writeable else np.array(image)
    return torch.from_numpy(array).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[B, 3, H, W] float pixels in [0, 1] -> normalised with per-channel `mean` / `std` (same units)."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() - m) / s


def check_rgb_uint8(image: np.ndarray) -> None:
    """Raise `ValueError` unless `image` is an HxWx3 uint8 array with H, W >= 1."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")


def resize_shape(hw: tuple[int, int], size: int | tuple[int, int] | None, mode: str) -> tuple[int, int]:
    """Target (height, width) for a resize request.

    Args:
        hw: input (height, width) in pixels.
        size: ``None`` keeps `hw`; a ``(height, width)`` tuple is taken as is; an int is interpreted by `mode`.
        mode: for an int `size`: ``"square"`` -> (size, size); ``"shortest"`` -> short side = size, aspect kept;
            ``"longest"`` -> long side = size, aspect kept. Kept sides are rounded to the nearest pixel.
    """
    if size is None:
        return hw
    if isinstance(size, Sequence):
        return int(size[0]), int(size[1])
    height, width = hw
    if mode == "square":
        return size, size
    if mode not in ("shortest", "longest"):
        raise ValueError(f"resize mode must be 'square', 'shortest' or 'longest', got {mode!r}")
    side = min(height, width) if mode == "shortest" else max(height, width)
    scale = size / side
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_normalized_tensor(
    image: np.ndarray,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    size: int | tuple[int, int] | None = None,
    resize_mode: str = "square",
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Normalise (and optionally resize) one RGB image.

    Args:
        image: HxWx3 uint8 RGB.
        mean: per-channel mean in [0, 1] units (CLIP by default; `IMAGENET_MEAN` for DINOv2).
        std: per-channel std in [0, 1] units.
        size: output size, see `resize_shape`; ``None`` keeps the input size.
        resize_mode: ``"square"``, ``"shortest"`` or ``"longest"``, see `resize_shape`.
        interpolation: ``torch.nn.functional.interpolate`` mode (``"bicubic"``, ``"bilinear"``, ``"nearest"``).
            Resizing is done in float on [0, 1] values with antialiasing for smooth modes, then clamped to [0, 1].

    Returns:
        float32 tensor [1, 3, H', W'] equal to ``(pixel / 255 - mean) / std``.
    """
    check_rgb_uint8(image)
    pixels = image_tensor(image)[None].float() / 255.0
    target = resize_shape(image.shape[:2], size, resize_mode)
    if target != tuple(image.shape[:2]):
        smooth = interpolation in ("bilinear", "bicubic")
        pixels = F.interpolate(pixels, size=target, mode=interpolation, antialias=smooth, align_corners=False
                               if smooth else None).clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t
