"""open_clip CLIP wrapper: prompt-ensembled text features, CLS embeddings, training-free dense features (MaskCLIP,
SCLIP, ClearCLIP, NACLIP or ProxyCLIP, ``ClipConfig.dense``) and sliding features (batched across images).

`Clip` composes an open_clip model (``Clip.model``) and never subclasses it. Weights come from
`pipeline.models.checkpoints`: a local path or fsspec URL is loaded by our strict loader (so a wrong architecture
fails with `CheckpointMismatchError` before any compute); a hub tag goes through open_clip (needs internet);
``None`` gives random weights drawn under ``init_seed``.

OpenAI weights loaded from a file need ``force_quick_gelu=True`` (or a ``*-quickgelu`` model name): only the
``openai`` tag switches QuickGELU on by itself, and the mismatch is silent. OpenAI's original TorchScript archives
cannot be read with ``weights_only=True``; convert them to a plain state dict first. Files are loaded strictly,
without open_clip's ``load_checkpoint`` conversions (big_vision ``.npz``, legacy text-tower keys, position-embedding
resizing): a file must match the architecture exactly. Building with a file or ``None`` sets ``HF_HUB_OFFLINE=1``
in the process environment (if unset), so nothing waits on DNS where no network is expected.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import resolve_device
from pipeline.models import clip_dense, sliding
from pipeline.models.accel import accelerate_clip
from pipeline.models.checkpoints import (
    is_hub_tag,
    load_checked,
    resolve_weights,
    seeded_init,
)
from pipeline.models.configs import ClipConfig, clip_identity, clip_weights_identity
from pipeline.models.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, to_normalized_tensor
from pipeline.models.sliding import ClipCanvas, SlidingFeatures, patch_centers

__all__ = ["Clip", "ClipCanvas", "ClipConfig", "SlidingFeatures", "patch_centers", "register_open_clip_configs"]

OPEN_CLIP_CONFIGS = (Path(__file__).resolve().parent / "configs" / "toy-vit.json",)
_registered = False
# Prompt-ensembled class embeddings shared by the `Clip`s of one process that `Clip.build` made from the same weights
# at the same precision (an eval with five dense backends encodes its prompts once): (text key, names, templates) ->
# float32 [M, D] on CPU; the dense backend and its proxy rewire only the image tower. The least recently used entries
# go first. A lock guards it: the scheduler runs a DAG's nodes in threads of one process.
SharedTextKey = tuple[str, tuple[str, ...], tuple[str, ...]]
_SHARED_TEXT: OrderedDict[SharedTextKey, torch.Tensor] = OrderedDict()
_SHARED_TEXT_ENTRIES = 16
_SHARED_TEXT_LOCK = threading.Lock()


def _shared_text(key: SharedTextKey | None) -> torch.Tensor | None:
    """The shared embeddings under `key`, or None (also for no key)."""
    with _SHARED_TEXT_LOCK:
        text = _SHARED_TEXT.get(key) if key is not None else None
        if text is not None:
            _SHARED_TEXT.move_to_end(key)
        return text


def _share_text(key: SharedTextKey | None, text: torch.Tensor) -> None:
    """Keep a CPU copy of `text` under `key` (nothing for no key), dropping the least recently used beyond the cap."""
    if key is None:
        return
    with _SHARED_TEXT_LOCK:
        _SHARED_TEXT[key] = text.cpu()
        while len(_SHARED_TEXT) > _SHARED_TEXT_ENTRIES:
            _SHARED_TEXT.popitem(last=False)


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "Model initialized randomly" warning (its `create_model` without a tag), which is false when
    the local weights file is loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_random_init(active: bool) -> Iterator[None]:
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    if active:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def register_open_clip_configs() -> None:
    """Register the tiny architectures in `OPEN_CLIP_CONFIGS` (``configs/toy-vit.json``) with open_clip, once.

    open_clip names a registered config after its file stem, so ``model_name="toy-vit"`` works afterwards.
    """
    global _registered
    if not _registered:
        import open_clip

        for path in OPEN_CLIP_CONFIGS:
            open_clip.add_model_config(path)
        _registered = True


class Clip:
    """A frozen open_clip model plus the feature extractors the pipeline needs (all under ``torch.no_grad``)."""

    def __init__(self, model: torch.nn.Module, cfg: ClipConfig, identity: str, proxy: Any = None,
                 text_key: str | None = None) -> None:
        """Wrap an already built open_clip model; use `Clip.build` to construct one from a `ClipConfig`.

        `proxy` is the `pipeline.models.dinov2.Dinov2` whose patch features give ProxyCLIP's attention
        (``cfg.dense == "proxyclip"`` only); `Clip.build` puts it on the CLIP's device unless ``cfg.proxy.device``
        names one. `text_key` names the text tower's weights and precision for the process-wide text cache
        (`Clip.build` sets it); without one, `encode_text` caches per instance only.
        """
        import open_clip

        if cfg.dense == "proxyclip" and proxy is None:
            raise ValueError("dense=proxyclip needs the proxy model (Clip.build builds it from cfg.proxy)")
        self.model = model.eval()
        self.proxy = proxy
        self.cfg = cfg
        self.identity = identity
        self.tokenizer = open_clip.get_tokenizer(cfg.model_name)
        preprocess_cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean: tuple[float, ...] = tuple(preprocess_cfg.get("mean", CLIP_MEAN))
        self.std: tuple[float, ...] = tuple(preprocess_cfg.get("std", CLIP_STD))
        self.text_key = text_key
        self._text_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}

    @classmethod
    def build(cls, cfg: ClipConfig) -> Clip:
        """Build the architecture and load weights (see module docstring).

        Raises:
            FileNotFoundError: ``cfg.pretrained`` is a path/URL that does not exist (message names the key).
            CheckpointMismatchError: the file does not fit ``cfg.model_name``.
        """
        register_open_clip_configs()
        ref = cfg.pretrained
        tag = ref if ref is not None and is_hub_tag(ref) else None
        if tag is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        local = None if tag else resolve_weights(ref, key="clip.pretrained")
        import open_clip

        with seeded_init(cfg.init_seed), _quiet_random_init(local is not None):
            model = open_clip.create_model(
                cfg.model_name, pretrained=tag, precision=cfg.precision, device=resolve_device(cfg.device),
                force_quick_gelu=cfg.force_quick_gelu,
            )
        if local is not None:
            load_checked(model, local, arch=f"open_clip {cfg.model_name}", source="clip.pretrained")
        accelerate_clip(model, cfg.compile)
        proxy = None
        if cfg.dense == "proxyclip":
            from pipeline.models.dinov2 import Dinov2

            proxy = Dinov2.build(cfg.proxy if cfg.proxy.device != "auto" else replace(cfg.proxy, device=cfg.device))
        return cls(model, cfg, identity=clip_identity(cfg), proxy=proxy,
                   text_key=f"{clip_weights_identity(cfg)}:{cfg.precision}")

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        """Native square input side in pixels (e.g. 224 for ViT-B/16)."""
        return int(self.model.visual.image_size[0])

    @property
    def patch_size(self) -> int:
        """ViT patch side in pixels (e.g. 16 for ViT-B/16)."""
        return int(self.model.visual.patch_size[0])

    @property
    def embed_dim(self) -> int:
        """Joint image-text embedding dimension D (512 for ViT-B/16, 768 for ViT-L/14)."""
        return int(self.model.visual.output_dim)

    @torch.no_grad()
    def encode_text(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Prompt-ensembled class embeddings.

        For each template the M prompts ``template.format(name)`` are encoded and L2-normalised; the per-class mean
        over templates is renormalised. Results are cached by (names, templates): per instance, and across the
        instances `Clip.build` made from the same weights and precision (``text_key``), whatever their dense backend.

        Args:
            names: M class names.
            templates: T templates with one ``{}`` each (see `pipeline.models.prompts`).

        Returns:
            float32 [M, D] L2-normalised, on the model's device.
        """
        key = (tuple(names), tuple(templates))
        if key not in self._text_cache:
            shared_key = None if self.text_key is None else (self.text_key, *key)
            text = _shared_text(shared_key)
            if text is None:
                text = self._ensemble(*key)
                _share_text(shared_key, text)
            self._text_cache[key] = text.to(self.device)
        return self._text_cache[key].clone()

    def _ensemble(self, names: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        if not names or not templates:
            raise ValueError("encode_text needs at least one name and one template")
        prompts = [template.format(name) for template in templates for name in names]
        feats = torch.cat([self._encode_prompts(prompts[i:i + self.cfg.text_batch_size])
                           for i in range(0, len(prompts), self.cfg.text_batch_size)])
        per_template = F.normalize(feats, dim=-1).view(len(templates), len(names), -1)
        return F.normalize(per_template.mean(dim=0), dim=-1)

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return self.model.encode_text(tokens).float()

    def preprocess(self, image: np.ndarray, size: int | tuple[int, int] | None = None,
                   resize_mode: str = "square") -> torch.Tensor:
        """HxWx3 uint8 RGB -> [1, 3, H', W'] float32 CLIP-normalised (bicubic resize, see `to_normalized_tensor`).

        ``size=None`` keeps the input size; pass ``self.image_size`` for the model's native square input.
        """
        return to_normalized_tensor(image, self.mean, self.std, size=size, resize_mode=resize_mode)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLS embeddings: [B, 3, H, W] CLIP-normalised (sides multiples of the patch) -> float32 [B, D] unit."""
        clip_dense.check_supported(self.model.visual)
        cls, _ = clip_dense.visual_forward(self.model.visual, pixels.to(self.device), dense=False)
        return cls

    @torch.no_grad()
    def dense_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense patch features of the configured backend (``cfg.dense``) and CLS embeddings.

        Args:
            pixels: [B, 3, H, W] CLIP-normalised, H and W multiples of `patch_size`.

        Returns:
            (patch float32 [B, D, H/p, W/p], cls float32 [B, D]), both L2-normalised along D. The CLS embedding is
            the unmodified model's (`encode_image`) whatever the backend.
        """
        clip_dense.check_supported(self.model.visual)
        pixels = pixels.to(self.device)
        cfg = self.cfg
        knobs = {"naclip_std": cfg.naclip_std, "proxy_beta": cfg.proxy_beta, "proxy_gamma": cfg.proxy_gamma}
        if cfg.dense == "proxyclip":
            knobs["proxy_features"] = self.proxy_features(pixels)
        cls, patch = clip_dense.visual_forward(
            self.model.visual, pixels, dense=True, residual_mlp=cfg.dense_residual_mlp, backend=cfg.dense, **knobs
        )
        return patch, cls

    def proxy_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """ProxyCLIP's foundation-model features on CLIP's patch grid.

        The CLIP-normalised pixels are mapped back to [0, 1], ImageNet-normalised and resized (bilinear, as ProxyCLIP
        resizes its foundation-model inputs) to (h * q, w * q) with q the proxy's patch, so the proxy's grid is CLIP's
        (h, w) = (H / p, W / p).

        Args:
            pixels: [B, 3, H, W] CLIP-normalised on this model's device.

        Returns:
            float32 [B, F, h, w] (not normalised) on this model's device.
        """
        def stats(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)

        unit = pixels.float() * stats(self.std) + stats(self.mean)
        normalised = (unit - stats(IMAGENET_MEAN)) / stats(IMAGENET_STD)
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        size = (grid[0] * self.proxy.patch_size, grid[1] * self.proxy.patch_size)
        normalised = F.interpolate(normalised, size=size, mode="bilinear", align_corners=False)
        return self.proxy.patch_features(normalised.to(self.proxy.device)).to(pixels.device)

    @torch.no_grad()
    def classify_crops(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits ``100 * cos(image, text)``: crops [B, 3, S, S] normalised, text [M, D] -> [B, M]."""
        image = self.encode_image(crops)
        return 100.0 * image @ F.normalize(text.to(image), dim=-1).T

    def prepare_canvas(self, image: np.ndarray, crop: int, stride: int, scale: float = 1.0) -> ClipCanvas:
        """Resize one image by `scale` (bicubic), normalise it and pad it for `sliding_features` (CPU only).

        The padding (bottom/right, the CLIP mean colour, i.e. 0 after normalisation) reaches at least one crop and
        a multiple of the patch; the crops are `crop` x `crop` windows every `stride` pixels, the last one flush
        with the border (`sliding.crop_grid`).

        Args:
            image: HxWx3 uint8 RGB.
            crop: window side in resized pixels, a multiple of `patch_size`.
            stride: window step in resized pixels, a multiple of `patch_size`.
            scale: resize factor applied first (e.g. 2.0 doubles the feature resolution).
        """
        sliding.check_geometry(crop, stride, self.patch_size)
        height, width = image.shape[:2]
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        pixels = self.preprocess(image, size=size if scale != 1.0 else None)
        padded = (sliding.padded_extent(size[0], crop, self.patch_size),
                  sliding.padded_extent(size[1], crop, self.patch_size))
        pixels = F.pad(pixels, (0, padded[1] - size[1], 0, padded[0] - size[0]))
        return ClipCanvas(pixels, sliding.crop_grid(padded, crop, stride), size, scale, (height, width))

    @torch.no_grad()
    def sliding_features(self, canvases: Sequence[ClipCanvas]) -> list[SlidingFeatures]:
        """High-resolution dense features (``cfg.dense``) of several images from overlapping crops, batched
        across images.

        The crops of all canvases (in order) go through `dense_features` in chunks of ``cfg.image_batch_size``
        (crops of one call must share their side). Each crop runs at its own resolution with interpolated position
        embeddings, so the patches of all crops of an image fall on one global grid with cell side `patch_size`
        (in resized pixels); overlapping features are averaged, then renormalised (`sliding.assemble`).

        Args:
            canvases: `prepare_canvas` outputs; how they are grouped does not change any image's features.

        Returns:
            One `SlidingFeatures` per canvas; boxes and strides are in original-image pixels (resized pixels /
            scale, exact up to the rounding of the resized image size).
        """
        crops = [canvas.pixels[:, :, y0:y1, x0:x1] for canvas in canvases for x0, y0, x1, y1 in canvas.boxes]
        step = self.cfg.image_batch_size
        outputs = [self.dense_features(torch.cat(crops[start:start + step])) for start in range(0, len(crops), step)]
        patches = torch.cat([patch for patch, _ in outputs]) if outputs else torch.empty(0)
        cls = torch.cat([crop_cls for _, crop_cls in outputs]) if outputs else torch.empty(0)
        results, offset = [], 0
        for canvas in canvases:
            count = len(canvas.boxes)
            grid = (-(-canvas.resized_hw[0] // self.patch_size), -(-canvas.resized_hw[1] // self.patch_size))
            results.append(SlidingFeatures(
                features=sliding.assemble(patches[offset:offset + count], canvas.boxes, self.patch_size, grid),
                crop_cls=cls[offset:offset + count],
                crop_boxes=(canvas.boxes / canvas.scale).astype(np.float32),
                patch_stride_px=self.patch_size / canvas.scale,
                image_hw=canvas.image_hw,
            ))
            offset += count
        return results

    def sliding_dense(self, image: np.ndarray, crop: int, stride: int, scale: float = 1.0) -> SlidingFeatures:
        """`sliding_features` of one image: see `prepare_canvas` for `crop`, `stride` and `scale`."""
        return self.sliding_features([self.prepare_canvas(image, crop, stride, scale)])[0]
