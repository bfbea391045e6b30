"""The toy DINOv2 training script's augmentation/probe helpers on hand cases, and the committed weights."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.configs import Dinov2Config
from pipeline.models.dinov2 import Dinov2

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "assets" / "models" / "toy_dinov2.pt"


def script():
    spec = importlib.util.spec_from_file_location("train_toy_dinov2", REPO / "scripts" / "train_toy_dinov2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hue_rotation_by_a_third_turn_maps_red_to_green_and_keeps_grey() -> None:
    pixels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.3]]).T.reshape(1, 3, 1, 3)
    rotated = script().hue_rotate(pixels, torch.tensor([2 * math.pi / 3]))
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.3, 0.3]]).T.reshape(1, 3, 1, 3)
    assert torch.allclose(rotated, expected, atol=1e-6)


def test_patch_majority_votes_each_cell() -> None:
    labels = np.array([[[1, 1, 2, 2], [1, 3, 2, 2], [0, 0, 5, 4], [0, 0, 4, 4]]], np.uint8)
    assert script().patch_majority(labels, 2).tolist() == [[[1, 2], [0, 4]]]


@pytest.mark.skipif(not WEIGHTS.exists(), reason="toy DINOv2 not present")
def test_committed_toy_dinov2_loads_strictly_and_is_not_the_random_init() -> None:
    trained = Dinov2.build(Dinov2Config(name="toy", weights=str(WEIGHTS), device="cpu"))
    random = Dinov2.build(Dinov2Config(name="toy", weights=None, device="cpu"))
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    features = trained.patch_features(pixels)
    assert features.shape == (1, 64, 8, 8)
    assert (features - random.patch_features(pixels)).abs().mean() > 0.1
    assert WEIGHTS.stat().st_size < 1_000_000
