"""IFSeg's K-NN post-processing through the predictors and the engine, against a hand-computed case.

The case: a 1 x 3 token grid (patch 2, image 2 x 6 px), two classes, K = 2 (self + one neighbour), one
propagation round.
  backbone features f0 = [1, 0], f1 = [1, 0.2], f2 = [0, 1]  ->  N(0) = {0, 1}, N(1) = {1, 0}, N(2) = {2, 1}
  decoder probabilities p0 = [.9, .1], p1 = [.1, .9], p2 = [.8, .2] (logits = log p)
  (by the probabilities themselves p0's nearest would be p2: the test tells the two affinities apart)
  one round: p0' = p1' = (p0 + p1) / 2 = [.5, .5], p2' = (p2 + p1) / 2 = [.45, .55]
  bilinear x2 along the width (align_corners=False), *as probabilities*: source x = (x + .5) / 2 - .5
    x = 0, 1, 2: [.5, .5];  x = 3: .75 p1' + .25 p2' = [.4875, .5125];  x = 4: .25 p1' + .75 p2' = [.4625, .5375];
    x = 5: [.45, .55].
Upsampling log-probabilities and taking a softmax afterwards gives [.4876, .5124] and [.4626, .5374] at x = 3, 4;
a softmax of the probabilities (treating them as logits) gives [.4938, .5062] at x = 3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.methods.configs import IFSegConfig
from pipeline.methods.ifseg import IFSegMethod
from pipeline.methods.registry import BuiltMethod, IFSegPredictor
from pipeline.predict.engine import predict_scores
from pipeline.predict.predictors import MaskClipPredictor
from pipeline.predict.protocol import Protocol

FEATURES = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.2, 1.0]]).view(1, 2, 1, 3)  # [B, D, h, w]: f0, f1, f2
PROBS = torch.tensor([[0.9, 0.1, 0.8], [0.1, 0.9, 0.2]]).view(1, 2, 1, 3)  # [B, C, h, w]: p0, p1, p2
EXPECTED_ROW = torch.tensor([[0.5, 0.5, 0.5, 0.4875, 0.4625, 0.45],
                             [0.5, 0.5, 0.5, 0.5125, 0.5375, 0.55]])  # [C, 6]


class FakeClip:
    """Patch 2, identity normalisation; dense features FEATURES whatever the pixels (checked to be 2 x 6)."""

    mean, std, patch_size, device = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 2, "cpu"

    def dense_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        assert pixels.shape[-2:] == (2, 6)
        return FEATURES.clone(), None


class FixedDecoder(torch.nn.Module):
    """The 'decoder': logits log PROBS, independent of its input (so its outputs cannot be the affinity)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        assert torch.equal(tokens, FEATURES)  # the decoder reads the backbone features
        return PROBS.log()


def ifseg_predictor(knn: bool) -> IFSegPredictor:
    method = IFSegMethod(IFSegConfig(knn_k=2, knn_iterations=1), torch.eye(2))
    return IFSegPredictor(BuiltMethod(method, FixedDecoder(), FakeClip()), knn)


def test_ifseg_knn_propagates_over_backbone_neighbours_then_upsamples_probabilities():
    out = ifseg_predictor(knn=True).logits(torch.zeros(1, 3, 2, 6))
    assert out.shape == (1, 2, 2, 6)
    torch.testing.assert_close(out[0, :, 0], EXPECTED_ROW, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, :, 1], EXPECTED_ROW, atol=1e-6, rtol=0)


def test_without_knn_the_predictor_returns_the_decoders_logits_upsampled():
    out = ifseg_predictor(knn=False).logits(torch.zeros(1, 3, 2, 6))
    expected = torch.nn.functional.interpolate(PROBS.log(), size=(2, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


def test_engine_keeps_knn_probabilities_as_they_are():
    image = np.zeros((2, 6, 3), dtype=np.uint8)  # short side 2: the protocol's resize is the identity
    protocol = Protocol(short_side=2, max_long_side=6, mode="whole", score="softmax", knn_postprocess=True)
    scores = predict_scores(image, ifseg_predictor(knn=True).logits, protocol, num_classes=2)
    torch.testing.assert_close(scores[:, 0], EXPECTED_ROW, atol=1e-6, rtol=0)
    assert scores[:, 0, 3].tolist() != pytest.approx([0.4938, 0.5062], abs=1e-3)  # no softmax on top


def test_maskclip_baseline_knn_uses_its_dense_features():
    clip = FakeClip()
    text = torch.eye(2)  # logits = 100 * cos(f, e_c): f0 -> [100, 0], f1 -> [98.06, 19.61], f2 -> [0, 100]
    plain = MaskClipPredictor(clip, text, knn=False).logits(torch.zeros(1, 3, 2, 6))
    propagated = MaskClipPredictor(clip, text, knn=True, knn_k=2, knn_iterations=1).logits(torch.zeros(1, 3, 2, 6))
    cos = torch.nn.functional.normalize(FEATURES, dim=1)
    p = torch.softmax(100.0 * cos, dim=1)[0, :, 0]  # [C, 3]
    grid = torch.stack([(p[:, 0] + p[:, 1]) / 2, (p[:, 0] + p[:, 1]) / 2, (p[:, 2] + p[:, 1]) / 2], dim=1)
    expected = torch.nn.functional.interpolate(grid[None, :, None], size=(2, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(propagated, expected, atol=1e-6, rtol=0)
    assert torch.allclose(plain[0, :, 0, 0], 100.0 * cos[0, :, 0, 0])
