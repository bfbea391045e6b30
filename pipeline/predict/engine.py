"""One test-time inference implementation for every evaluation protocol (`pipeline.predict.protocol`).

A protocol (IFSeg, ZegCLIP, ZSSeg, TCL/FMbSeg) is data: resize rule, whole-image or sliding-window
inference, score transform and seen-class penalty. A model is a callable that maps un-normalised RGB
pixels in [0, 1] to class logits; normalisation and any feature post-processing (IFSeg K-NN) are its job.
Patch-grid models (ViTs) run on any image size through `on_patch_grid`.

Order of operations (mmseg `EncoderDecoder.inference` / ZegCLIP `slide_inference`):
1. resize keeping aspect ratio: scale = min(short_side / min(H, W), max_long_side / max(H, W)),
   new size = int(side · scale + 0.5) (mmcv `rescale_size`); bilinear, align_corners=False, no antialias,
   rounded back to uint8 like `mmcv.imrescale`, then divided by 255;
2. whole: one forward; slide: the mmseg window grid, each window's logits resized to the window size,
   summed into the canvas and divided by the per-pixel window count;
3. logits resized bilinearly (align_corners=False) to the ORIGINAL image size;
4. score transform, seen-class penalty, argmax over classes.

Where the score transform sits: "sigmoid" is applied to each forward's output right after it is resized
to that forward's input size, before windows are averaged, as ZegCLIP's head does (`semantic_inference`);
"softmax" is applied once to the averaged, original-size logits, as mmseg does. The seen penalty is a
constant per class, so applying it per window (ZegCLIP) or once at the end (here) gives the same scores.
With `knn_postprocess` the model already returns class probabilities (IFSeg's K-NN propagates softmax
probabilities on the token grid); they are resized (bilinear, as probabilities) and averaged, and no score
transform is applied.

Choices where the sources are silent or differ: a window larger than the image is zero-padded (black,
bottom/right) to the full crop size, so fixed-input-size ViTs work; mmseg instead feeds the smaller crop
unpadded. detectron2 (ZSSeg) resizes with PIL, which antialiases when downscaling; this module does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.preprocess import image_tensor
from pipeline.predict.protocol import Protocol

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def on_patch_grid(normalised: torch.Tensor, patch: int,
                  grid_logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run a patch-grid model on any image size.

    Zero-pads the normalised pixels [1, 3, h, w] bottom/right to multiples of `patch` (zero = the mean colour
    after normalisation), calls `grid_logits` (-> [1, C, ceil(h/p), ceil(w/p)]), upsamples bilinearly
    (align_corners=False) to the padded size and crops back to [1, C, h, w].
    """
    _, _, height, width = normalised.shape
    padded_h, padded_w = -(-height // patch) * patch, -(-width // patch) * patch
    scores = grid_logits(F.pad(normalised, (0, padded_w - width, 0, padded_h - height)))
    scores = F.interpolate(scores, size=(padded_h, padded_w), mode="bilinear", align_corners=False)
    return scores[:, :, :height, :width]


def rescale_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """(new_height, new_width) after keep-ratio resizing with mmcv's rounding (int(x · scale + 0.5))."""
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg sliding-window grid as (y1, y2, x1, x2) pixel boxes, end-exclusive, row-major.

    grids = max(ceil((side − crop) / stride), 0) + 1 per axis; a window that would cross the border is
    shifted back inside it (y1 = max(y2 − crop, 0)), so the last window ends exactly at the border.
    """
    boxes = []
    for y_idx in range(max(height - crop + stride - 1, 0) // stride + 1):
        for x_idx in range(max(width - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(y_idx * stride + crop, height), min(x_idx * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [N, C, h, w] to `size` (align_corners=False); identity when already that size."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


def score_kind(protocol: Protocol) -> str:
    """What the engine does with a model's outputs: "sigmoid", "softmax", or "probabilities" (K-NN: none)."""
    return "probabilities" if protocol.knn_postprocess else protocol.score


def _forward(pixels: torch.Tensor, logits_fn: LogitsFn, num_classes: int, score: str) -> torch.Tensor:
    """Outputs of one forward resized to the input's size: [1, C, h, w] float32 (sigmoid applied if asked)."""
    logits = logits_fn(pixels)
    if logits.ndim != 4 or logits.shape[:2] != (1, num_classes):
        raise ValueError(f"logits_fn must return [1, {num_classes}, h, w], got {tuple(logits.shape)}")
    logits = _resize(logits.float().to(pixels.device), tuple(pixels.shape[-2:]))
    return logits.sigmoid() if score == "sigmoid" else logits  # "probabilities": as they are


def slide_logits(
    pixels: torch.Tensor, logits_fn: LogitsFn, num_classes: int, protocol: Protocol
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window logits of a [1, 3, h, w] image: ([1, C, h, w] window average, [1, 1, h, w] window count)."""
    _, _, height, width = pixels.shape
    crop = protocol.crop
    canvas = pixels.new_zeros((1, num_classes, height, width))
    count = pixels.new_zeros((1, 1, height, width))
    for y1, y2, x1, x2 in slide_windows(height, width, crop, protocol.stride):
        window = pixels[:, :, y1:y2, x1:x2]
        pad_h, pad_w = crop - (y2 - y1), crop - (x2 - x1)
        if pad_h or pad_w:
            window = F.pad(window, (0, pad_w, 0, pad_h))
        logits = _forward(window, logits_fn, num_classes, score_kind(protocol))
        canvas[:, :, y1:y2, x1:x2] += logits[:, :, : y2 - y1, : x2 - x1]
        count[:, :, y1:y2, x1:x2] += 1
    if bool((count == 0).any()):
        raise RuntimeError("sliding windows left pixels uncovered; check crop and stride")
    return canvas / count, count


def predict_scores(
    image: np.ndarray,
    logits_fn: LogitsFn,
    protocol: Protocol,
    num_classes: int,
    seen_ids: Sequence[int] = (),
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Per-class scores at the original resolution: [C, H, W] float32 on `device`, after transform and penalty.

    Args:
        image: [H, W, 3] uint8 RGB.
        logits_fn: maps [1, 3, h, w] float32 pixels in [0, 1] (un-normalised) to [1, C, h', w'] logits
            (class probabilities when `protocol.knn_postprocess`).
        protocol: the test-time protocol.
        num_classes: C.
        seen_ids: class ids that receive `protocol.seen_penalty`.
        device: where resizing and accumulation run (the callable receives tensors on it).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    pixels = image_tensor(image).to(device)[None].float()
    size = rescale_size(height, width, protocol.short_side, protocol.max_long_side)
    pixels = _resize(pixels, size).round().clamp(0, 255) / 255.0
    with torch.no_grad():
        if protocol.mode == "slide":
            logits, _ = slide_logits(pixels, logits_fn, num_classes, protocol)
        else:
            logits = _forward(pixels, logits_fn, num_classes, score_kind(protocol))
        scores = _resize(logits, (height, width))[0]
        if score_kind(protocol) == "softmax":
            scores = scores.softmax(dim=0)
        if protocol.seen_penalty and len(seen_ids):
            scores[torch.as_tensor(list(seen_ids), dtype=torch.long, device=scores.device)] -= protocol.seen_penalty
    return scores


def predict(
    image: np.ndarray,
    logits_fn: LogitsFn,
    protocol: Protocol,
    num_classes: int,
    seen_ids: Sequence[int] = (),
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Predicted class ids at the original resolution: [H, W] int64 (argmax of `predict_scores`)."""
    scores = predict_scores(image, logits_fn, protocol, num_classes, seen_ids, device)
    return scores.argmax(dim=0).cpu().numpy().astype(np.int64)
