"""Sliding-window geometry for high-resolution dense CLIP features (Seifi et al. §3.1 step 1).

An image is resized, normalised and padded into a `ClipCanvas` (`Clip.prepare_canvas`, CPU work that can run in a
prefetch thread); the crops of one or many canvases then share CLIP encoder calls (`Clip.sliding_features`), and
each canvas' patch features are assembled on its own grid (`assemble`) into `SlidingFeatures`.

Coordinates are continuous pixel coordinates: pixel (row r, col c) covers [c, c+1) x [r, r+1), so an image of width
W spans x in [0, W]. This is the convention of SAM's point prompts and of its automatic mask generator's grids.
Patch (i, j) of a grid with stride s pixels covers x in [j*s, (j+1)*s), y in [i*s, (i+1)*s); its centre is
((j + 0.5) * s, (i + 0.5) * s) in (x, y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ClipCanvas:
    """One image prepared for sliding-window CLIP features (`Clip.prepare_canvas`).

    Attributes:
        pixels: float32 [1, 3, Hc, Wc] CLIP-normalised, resized by `scale` (bicubic), padded bottom/right with 0 (the
            CLIP mean colour) to at least one crop and a multiple of the patch.
        boxes: int64 [C, 4] XYXY crop boxes on the padded canvas, row-major (`crop_grid`).
        resized_hw: (H', W') of the resized image before padding, pixels.
        scale: resize factor from the original image to the canvas.
        image_hw: (H, W) of the original image, pixels.
    """

    pixels: torch.Tensor
    boxes: np.ndarray
    resized_hw: tuple[int, int]
    scale: float
    image_hw: tuple[int, int]


@dataclass
class SlidingFeatures:
    """Dense CLIP features of a whole image assembled from sliding crops.

    Attributes:
        features: float32 [D, Hp, Wp] L2-normalised MaskCLIP patch features on the image's patch grid; where crops
            overlap the per-crop features are averaged, then renormalised. The grid covers the image; its last
            row/column may extend past the image border into padding (``Hp = ceil(H * scale / patch)``).
        crop_cls: float32 [C, D] L2-normalised CLS embedding of each crop.
        crop_boxes: float32 [C, 4] XYXY crop extents in original-image pixels (may extend past the image where it
            was padded).
        patch_stride_px: side of one grid cell in original-image pixels (``patch_size / scale``).
        image_hw: (H, W) of the original image in pixels.
    """

    features: torch.Tensor
    crop_cls: torch.Tensor
    crop_boxes: np.ndarray
    patch_stride_px: float
    image_hw: tuple[int, int]

    def centers(self) -> np.ndarray:
        """Patch centres of `features` as float32 [Hp, Wp, 2] (x, y) original-image pixels, see `patch_centers`."""
        return patch_centers(tuple(self.features.shape[-2:]), self.patch_stride_px)


def patch_centers(grid_hw: tuple[int, int], patch_stride_px: float) -> np.ndarray:
    """Pixel coordinates of patch centres.

    Args:
        grid_hw: (h, w) patch grid.
        patch_stride_px: cell side in pixels.

    Returns:
        float32 [h, w, 2]; entry [i, j] = ((j + 0.5) * s, (i + 0.5) * s) as (x, y), continuous pixel coordinates.
    """
    ys = (np.arange(grid_hw[0], dtype=np.float64) + 0.5) * patch_stride_px
    xs = (np.arange(grid_hw[1], dtype=np.float64) + 0.5) * patch_stride_px
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x, grid_y], axis=-1).astype(np.float32)


def short_side_scale(image_hw: tuple[int, int], short_side: int | None) -> float:
    """Resize factor that brings the short side of an (H, W) image to `short_side` pixels (1.0 for None)."""
    return 1.0 if short_side is None else short_side / min(image_hw)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of size `crop` every `stride` pixels over ``[0, length)``, last one flush right.

    Args:
        length: padded extent (>= crop).
        crop: window size.
        stride: step; the last window is moved to ``length - crop`` if the regular steps do not reach the end.
    """
    if length < crop:
        raise ValueError(f"length {length} is smaller than the crop {crop}; pad first")
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)
    return starts


def check_geometry(crop: int, stride: int, patch: int) -> None:
    """Crop and stride must be positive multiples of the patch size, so every crop lands on the global grid."""
    if crop <= 0 or stride <= 0 or crop % patch or stride % patch:
        raise ValueError(f"crop ({crop}) and stride ({stride}) must be positive multiples of the patch size ({patch})")


def padded_extent(length: int, crop: int, patch: int) -> int:
    """Smallest multiple of `patch` that is >= max(length, crop)."""
    return math.ceil(max(length, crop) / patch) * patch


def crop_grid(padded_hw: tuple[int, int], crop: int, stride: int) -> np.ndarray:
    """All crop boxes as int64 [C, 4] XYXY over a padded canvas, row-major (top row of crops first)."""
    boxes = [
        (x0, y0, x0 + crop, y0 + crop)
        for y0 in window_starts(padded_hw[0], crop, stride)
        for x0 in window_starts(padded_hw[1], crop, stride)
    ]
    return np.asarray(boxes, dtype=np.int64)


def assemble(patches: torch.Tensor, boxes: np.ndarray, patch: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Average per-crop patch features onto the global grid and renormalise.

    Args:
        patches: [C, D, c, c] per-crop patch features (c = crop / patch).
        boxes: [C, 4] XYXY crop boxes on the padded canvas (multiples of `patch`).
        patch: patch size in canvas pixels.
        grid_hw: (Hp, Wp) output grid (may be smaller than the padded canvas grid; extra cells are dropped).

    Returns:
        float32 [D, Hp, Wp] L2-normalised along D.
    """
    num_crops, dim, cells, _ = patches.shape
    canvas_h = int(boxes[:, 3].max()) // patch
    canvas_w = int(boxes[:, 2].max()) // patch
    total = torch.zeros(dim, canvas_h, canvas_w, dtype=torch.float32, device=patches.device)
    count = torch.zeros(1, canvas_h, canvas_w, dtype=torch.float32, device=patches.device)
    for index in range(num_crops):
        col, row = int(boxes[index, 0]) // patch, int(boxes[index, 1]) // patch
        total[:, row:row + cells, col:col + cells] += patches[index].float()
        count[:, row:row + cells, col:col + cells] += 1.0
    mean = total[:, : grid_hw[0], : grid_hw[1]] / count[:, : grid_hw[0], : grid_hw[1]].clamp_min(1.0)
    return torch.nn.functional.normalize(mean, dim=0)
