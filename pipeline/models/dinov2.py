"""DINOv2 (transformers ``Dinov2Model``) wrapper: patch-token features for the FMbSeg alignment module.

Presets mirror the released ``facebook/dinov2-*`` configs (patch 14, image size 518, layer scale 1.0; giant uses a
SwiGLU FFN); ``toy`` (``configs/dinov2-toy.json``) is a 64-wide 2-layer model for tests. Weights come either from a
transformers directory (``save_pretrained`` layout: ``config.json`` + ``model.safetensors``), loaded with
``Dinov2Model.from_pretrained(dir, local_files_only=True)`` after checking its config against the preset, or from a
single state-dict file (``.safetensors``/``.bin``/``.pt``) in transformers key layout (e.g. the ``model.safetensors``
of such a directory), loaded with ``from_pretrained(None, config=preset, state_dict=...)``. Any missing, unexpected
or mismatched key is an error. The official ``facebookresearch/dinov2`` ``.pth`` files use other key names and need
converting first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import resolve_device
from pipeline.models.checkpoints import (
    CheckpointMismatchError,
    load_state_dict,
    resolve_weights,
    seeded_init,
)
from pipeline.models.configs import Dinov2Config, dinov2_identity
from pipeline.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_normalized_tensor

TOY_CONFIG = Path(__file__).resolve().parent / "configs" / "dinov2-toy.json"
_COMMON: dict[str, Any] = {"patch_size": 14, "image_size": 518, "mlp_ratio": 4, "layerscale_value": 1.0}
PRESETS: dict[str, dict[str, Any]] = {
    "dinov2-small": {**_COMMON, "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "dinov2-base": {**_COMMON, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "dinov2-large": {**_COMMON, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "dinov2-giant": {**_COMMON, "hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24,
                     "use_swiglu_ffn": True},
}
_CHECKED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "use_swiglu_ffn")


def preset_config(name: str) -> Any:
    """transformers ``Dinov2Config`` of a preset name (``toy`` reads ``configs/dinov2-toy.json``)."""
    from transformers import Dinov2Config as HfDinov2Config

    if name == "toy":
        return HfDinov2Config(**json.loads(TOY_CONFIG.read_text()))
    if name not in PRESETS:
        raise ValueError(f"dinov2.name must be one of {sorted(PRESETS) + ['toy']}, got {name!r}")
    return HfDinov2Config(**PRESETS[name])


def _check_dir_config(directory: Path, expected: Any, name: str) -> None:
    """Fail before loading when a transformers directory's config.json is not the preset's architecture."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"dinov2.weights: {config_path} does not exist (expected a save_pretrained folder)")
    found = json.loads(config_path.read_text())
    for key in _CHECKED_FIELDS:
        want = getattr(expected, key)
        if key in found and found[key] != want:
            raise CheckpointMismatchError(
                f"dinov2.weights ({directory}) does not match the expected architecture dinov2 {name}: "
                f"config.json has {key}={found[key]!r}, preset expects {want!r}. Set dinov2.name to the preset "
                f"of the checkpoint."
            )


def _load_pretrained(path: Path, expected: Any, name: str) -> torch.nn.Module:
    """Load a transformers directory or state-dict file through ``from_pretrained`` (which maps legacy key names).

    transformers only warns about missing/unexpected/mismatched keys and initialises missing weights randomly;
    here any such key is an error.
    """
    from transformers import Dinov2Model

    if path.is_dir():
        _check_dir_config(path, expected, name)
        model, info = Dinov2Model.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    else:
        model, info = Dinov2Model.from_pretrained(
            None, config=expected, state_dict=load_state_dict(path), output_loading_info=True
        )
    problems = [f"{kind}: {sorted(map(str, info[kind]))[:5]}" for kind in ("missing_keys", "unexpected_keys",
                                                                          "mismatched_keys") if info.get(kind)]
    if problems:
        raise CheckpointMismatchError(
            f"dinov2.weights ({path}) does not match the expected architecture dinov2 {name}: " + "; ".join(problems)
        )
    return model


class Dinov2:
    """A frozen DINOv2 backbone returning patch-token grids (CLS and register tokens dropped)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, model: torch.nn.Module, cfg: Dinov2Config, identity: str) -> None:
        """Wrap a built ``Dinov2Model``; use `Dinov2.build` to construct one from a `Dinov2Config`."""
        self.model = model.eval()
        self.cfg = cfg
        self.identity = identity

    @classmethod
    def build(cls, cfg: Dinov2Config) -> Dinov2:
        """Random init from the preset, or load ``cfg.weights`` (directory or file, see module docstring).

        Raises:
            FileNotFoundError: the weights path/URL does not exist (message names ``dinov2.weights``).
            CheckpointMismatchError: the weights do not fit the preset ``cfg.name``.
        """
        expected = preset_config(cfg.name)
        local = resolve_weights(cfg.weights, key="dinov2.weights", allow_tags=False)
        if local is None:
            from transformers import Dinov2Model

            with seeded_init(cfg.init_seed):
                model = Dinov2Model(expected)
        else:
            model = _load_pretrained(Path(local), expected, cfg.name)
        model.to(resolve_device(cfg.device))
        return cls(model, cfg, identity=dinov2_identity(cfg))

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def patch_size(self) -> int:
        """Patch side in pixels (14 for all presets)."""
        size = self.model.config.patch_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def embed_dim(self) -> int:
        """Patch feature dimension D (768 for dinov2-base, 1024 for dinov2-large)."""
        return int(self.model.config.hidden_size)

    def preprocess(self, image: np.ndarray, size: int | tuple[int, int] | None = None,
                   resize_mode: str = "square") -> torch.Tensor:
        """HxWx3 uint8 RGB -> [1, 3, H', W'] float32 ImageNet-normalised (bicubic; see `to_normalized_tensor`)."""
        return to_normalized_tensor(image, self.mean, self.std, size=size, resize_mode=resize_mode)

    @torch.no_grad()
    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Final-layer (post-LayerNorm) patch tokens as a grid.

        Args:
            pixels: [B, 3, H, W] ImageNet-normalised; H and W multiples of `patch_size` (position embeddings are
                interpolated by transformers for sizes other than 518).

        Returns:
            float32 [B, D, H/14, W/14] (not normalised).
        """
        height, width = pixels.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {(height, width)} is not a multiple of the patch size {self.patch_size}")
        tokens = self.model(pixel_values=pixels.to(self.device)).last_hidden_state
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        patches = tokens[:, tokens.shape[1] - grid_h * grid_w:]
        return patches.float().transpose(1, 2).reshape(pixels.shape[0], -1, grid_h, grid_w)
