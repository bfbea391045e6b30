"""Model plumbing of the pseudolabel stage: CLIP sliding-window features batched across images, and SAM's
automatic mask generator run on image embeddings that were already computed in a batch.

Both functions give the same numbers as the per-image wrappers (`Clip.sliding_dense`, `Sam.generate`); they only
remove repeated work: crops of many images share CLIP encoder calls, and the automatic mask generator reuses the
SAM image embedding that stage 1.1 computed instead of encoding the image a second time.

torch, open_clip and segment_anything are imported by the callers' models; this module imports torch lazily.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from pipeline.data.records import ImageRecord
    from pipeline.models.clip import Clip
    from pipeline.models.sam import AmgConfig, Sam, SamImageEmbeddings
    from pipeline.models.sliding import SlidingFeatures


@dataclass
class ClipCanvas:
    """One image prepared for sliding-window CLIP (built in the prefetch thread, see `prepare_canvas`).

    Attributes:
        pixels: float32 [1, 3, Hc, Wc] CLIP-normalised, resized by `scale`, padded bottom/right with 0 (the CLIP
            mean colour) to at least one crop and a multiple of the patch.
        boxes: int64 [C, 4] XYXY crop boxes on the padded canvas, row-major.
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
class Loaded:
    """A decoded input (prefetch thread): the record and, when it loaded, its CLIP canvas."""

    record: ImageRecord
    canvas: ClipCanvas | None = None


def canvas_scale(image_hw: tuple[int, int], short_side: int | None) -> float:
    """Resize factor that brings the short side to `short_side` pixels (1.0 when `short_side` is None)."""
    return 1.0 if short_side is None else short_side / min(image_hw)


def prepare_canvas(clip: Clip, image: np.ndarray, crop: int, stride: int, short_side: int | None) -> ClipCanvas:
    """Resize (bicubic), normalise and pad one HxWx3 uint8 image exactly as `Clip.sliding_dense` does."""
    import torch.nn.functional as F

    from pipeline.models import sliding

    sliding.check_geometry(crop, stride, clip.patch_size)
    height, width = image.shape[:2]
    scale = canvas_scale((height, width), short_side)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    pixels = clip.preprocess(image, size=size if scale != 1.0 else None)
    padded = (sliding.padded_extent(size[0], crop, clip.patch_size),
              sliding.padded_extent(size[1], crop, clip.patch_size))
    pixels = F.pad(pixels, (0, padded[1] - size[1], 0, padded[0] - size[0]))
    return ClipCanvas(pixels, sliding.crop_grid(padded, crop, stride), size, scale, (height, width))


def _crop_stream(canvases: Sequence[ClipCanvas]) -> Iterator[tuple[int, torch.Tensor]]:
    for index, canvas in enumerate(canvases):
        for x0, y0, x1, y1 in canvas.boxes:
            yield index, canvas.pixels[:, :, y0:y1, x0:x1]


def sliding_features(clip: Clip, canvases: Sequence[ClipCanvas]) -> list[SlidingFeatures]:
    """MaskCLIP dense features and per-crop CLS embeddings of several images, crops batched across images.

    Crops of all images go through `Clip.dense_features` in chunks of ``clip.cfg.image_batch_size`` (crops of
    one batch all have the same side, so they stack); each image's patches are then assembled on its own grid.

    Args:
        clip: the CLIP wrapper.
        canvases: prepared images (`prepare_canvas`), all with the same crop side.

    Returns:
        One `SlidingFeatures` per canvas, equal to ``clip.sliding_dense(image, crop, stride, scale)``.
    """
    import torch

    from pipeline.models import sliding

    patches: list[list[torch.Tensor]] = [[] for _ in canvases]
    cls: list[list[torch.Tensor]] = [[] for _ in canvases]
    stream = _crop_stream(canvases)
    while chunk := [item for _, item in zip(range(clip.cfg.image_batch_size), stream)]:
        patch, crop_cls = clip.dense_features(torch.cat([pixels for _, pixels in chunk]))
        for row, (index, _) in enumerate(chunk):
            patches[index].append(patch[row:row + 1])
            cls[index].append(crop_cls[row:row + 1])
    results = []
    for index, canvas in enumerate(canvases):
        grid = (-(-canvas.resized_hw[0] // clip.patch_size), -(-canvas.resized_hw[1] // clip.patch_size))
        features = sliding.assemble(torch.cat(patches[index]), canvas.boxes, clip.patch_size, grid)
        results.append(sliding.SlidingFeatures(
            features=features, crop_cls=torch.cat(cls[index]),
            crop_boxes=(canvas.boxes / canvas.scale).astype(np.float32),
            patch_stride_px=clip.patch_size / canvas.scale, image_hw=canvas.image_hw,
        ))
    return results


def _autocast(sam: Sam) -> Any:
    import contextlib

    import torch

    if sam.cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if sam.cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=sam.device.type, dtype=dtype)


def generate_from_embeddings(sam: Sam, embeddings: SamImageEmbeddings, index: int, image: np.ndarray,
                             amg: AmgConfig) -> list[dict[str, Any]]:
    """SAM's automatic mask generator on image `index` of an already-encoded batch.

    segment_anything's generator calls ``predictor.set_image`` once per crop box; for the full-image box (the
    only one when ``amg.crop_n_layers == 0``) the precomputed embedding is installed instead of re-running the
    image encoder, which is bit-identical because `Sam.embed_images` applies the predictor's own transform.
    Crop-layer boxes (smaller images) are still encoded by the predictor.

    Args:
        sam: the SAM wrapper.
        embeddings: `Sam.embed_images` output containing the image.
        index: position of the image in `embeddings`.
        image: HxWx3 uint8 RGB, the same image that was embedded.
        amg: generator knobs.

    Returns:
        segment_anything's records with COCO RLE ``segmentation`` (see `Sam.generate`).
    """
    import torch
    from segment_anything import SamAutomaticMaskGenerator

    if amg.min_mask_region_area > 0:
        import cv2  # noqa: F401 - segment_anything needs it for small-region removal; fail early and clearly
    generator = SamAutomaticMaskGenerator(sam.model, output_mode="coco_rle", **asdict(amg))
    predictor = generator.predictor
    encode_crop = predictor.set_image

    def set_image(crop: np.ndarray, image_format: str = "RGB") -> None:
        if crop.shape[:2] != image.shape[:2]:
            encode_crop(crop, image_format)
            return
        predictor.reset_image()
        predictor.original_size = tuple(crop.shape[:2])
        predictor.input_size = tuple(embeddings.input_sizes[index])
        predictor.features = embeddings.features[index:index + 1].to(predictor.device)
        predictor.is_image_set = True

    predictor.set_image = set_image
    with torch.no_grad(), _autocast(sam):
        return generator.generate(image)
