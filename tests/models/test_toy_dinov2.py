"""The toy DINOv2 training script's augmentation/crop/probe helpers on hand cases, and the committed weights."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.configs import Dinov2Config
from pipeline.models.dinov2 import Dinov2

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "assets" / "models" / "toy_dinov2.pt"


def test_hue_rotation_by_a_third_turn_maps_red_to_green_and_keeps_grey(toy_dinov2_script) -> None:
    pixels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.3]]).T.reshape(1, 3, 1, 3)
    rotated = toy_dinov2_script.hue_rotate(pixels, torch.tensor([2 * math.pi / 3]))
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.3, 0.3]]).T.reshape(1, 3, 1, 3)
    assert torch.allclose(rotated, expected, atol=1e-6)


def test_patch_majority_votes_each_cell(toy_dinov2_script) -> None:
    labels = np.array([[[1, 1, 2, 2], [1, 3, 2, 2], [0, 0, 5, 4], [0, 0, 4, 4]]], np.uint8)
    assert toy_dinov2_script.patch_majority(labels, 2).tolist() == [[[1, 2], [0, 4]]]


@pytest.mark.skipif(not WEIGHTS.exists(), reason="toy DINOv2 not present")
def test_committed_toy_dinov2_loads_strictly_and_is_not_the_random_init() -> None:
    trained = Dinov2.build(Dinov2Config(name="toy", weights=str(WEIGHTS), device="cpu"))
    random = Dinov2.build(Dinov2Config(name="toy", weights=None, device="cpu"))
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    features = trained.patch_features(pixels)
    assert features.shape == (1, 64, 8, 8)
    assert (features - random.patch_features(pixels)).abs().mean() > 0.1
    assert WEIGHTS.stat().st_size < 1_000_000


def test_overlap_tokens_sample_both_crops_of_a_scene_at_the_same_scene_points(toy_dinov2_script) -> None:
    """Crops of an image whose channels are its own x and y coordinates, tokens = each crop's mean per 14-px
    patch: resampled over the two crops' intersection, both crops (flipped ones included) must give the lattice's
    scene coordinates, bin centres of a 4 x 4 lattice over the intersection."""
    script = toy_dinov2_script
    size, grid = 128, 4
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    scenes = torch.stack([xs / size, ys / size, torch.zeros_like(xs)])[None].repeat(8, 1, 1, 1)
    no_colour = argparse.Namespace(colour_strength=0.0, grey_p=0.0)
    crops, boxes, flip = script.random_crops(scenes, torch.Generator().manual_seed(3), 2, (0.35, 1.0), 112, no_colour)
    assert flip.any() and not flip.all()  # both orientations are exercised
    tokens = torch.nn.functional.avg_pool2d(crops * script.STD + script.MEAN, 14).flatten(2).transpose(1, 2)
    first, second = boxes.chunk(2)
    region = torch.cat([torch.maximum(first[:, :2], second[:, :2]), torch.minimum(first[:, 2:], second[:, 2:])], 1)
    region = torch.cat([region, region])
    sampled = script.overlap_tokens(tokens, boxes, flip, region, grid)  # (16, 4, 4, 3)
    centres = (torch.arange(grid) + 0.5) / grid
    expected_x = (region[:, :1] + centres * (region[:, 2:3] - region[:, :1])) / size  # (16, 4) per column
    expected_y = (region[:, 1:2] + centres * (region[:, 3:4] - region[:, 1:2])) / size  # per row
    patch = 14 / 112 * (boxes[:, 2] - boxes[:, 0]).min() / size  # one patch, in these units
    # Measured: 0.011 at most (bilinear sampling of patch means near the crop borders); a flipped crop read
    # unflipped is off by up to the intersection's width.
    assert (sampled[..., 0] - expected_x[:, None, :]).abs().max() < 0.25 * patch
    assert (sampled[..., 1] - expected_y[:, :, None]).abs().max() < 0.25 * patch
