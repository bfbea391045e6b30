"""DINOv2 wrapper on the toy preset: patch-token grid layout, presets, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.dinov2 import Dinov2, Dinov2Config, preset_config
from pipeline.models.preprocess import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def toy_dinov2() -> Dinov2:
    return Dinov2.build(Dinov2Config(name="toy"))


@torch.no_grad()
def test_patch_features_are_row_major_patch_tokens(toy_dinov2: Dinov2) -> None:
    pixels = torch.randn(2, 3, 42, 70, generator=torch.Generator().manual_seed(0))
    grid = toy_dinov2.patch_features(pixels)
    assert grid.shape == (2, 64, 3, 5) and grid.dtype == torch.float32
    tokens = toy_dinov2.model(pixel_values=pixels).last_hidden_state  # [B, 1 + 15, 64], CLS first
    assert tokens.shape[1] == 16
    torch.testing.assert_close(grid[:, :, 1, 2], tokens[:, 1 + 1 * 5 + 2])
    torch.testing.assert_close(grid[:, :, 0, 0], tokens[:, 1])


def test_properties_identity_and_normalisation(toy_dinov2: Dinov2) -> None:
    assert (toy_dinov2.patch_size, toy_dinov2.embed_dim) == (14, 64)
    assert toy_dinov2.identity == "dinov2:toy@random-init:seed=0"
    image = np.zeros((28, 14, 3), dtype=np.uint8)
    pixels = toy_dinov2.preprocess(image)
    assert pixels.shape == (1, 3, 28, 14)
    torch.testing.assert_close(pixels[0, :, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


def test_input_must_be_patch_multiple(toy_dinov2: Dinov2) -> None:
    with pytest.raises(ValueError, match="patch size"):
        toy_dinov2.patch_features(torch.zeros(1, 3, 40, 42))


def test_presets_match_released_sizes() -> None:
    sizes = {name: (preset_config(name).hidden_size, preset_config(name).num_hidden_layers,
                    preset_config(name).num_attention_heads) for name in ("dinov2-small", "dinov2-base",
                                                                          "dinov2-large", "dinov2-giant")}
    assert sizes == {"dinov2-small": (384, 12, 6), "dinov2-base": (768, 12, 12), "dinov2-large": (1024, 24, 16),
                     "dinov2-giant": (1536, 40, 24)}
    assert preset_config("dinov2-giant").use_swiglu_ffn and preset_config("dinov2-large").patch_size == 14
    with pytest.raises(ValueError, match="dinov2-base"):
        preset_config("dinov2-huge")
