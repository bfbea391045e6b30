"""Training-free dense backends (SCLIP, ClearCLIP, NACLIP, ProxyCLIP): hand-checked small cases, and every backend
against an independent re-implementation of its equations that runs open_clip's own ``nn.MultiheadAttention`` of
the last block with rewired projections and an additive mask (``toy-vit``, random weights)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, build_config
from pipeline.models import clip_dense
from pipeline.models.clip import Clip, ClipConfig
from pipeline.models.configs import Dinov2Config, clip_identity


def _pixels(height: int = 64, width: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _rewired(attn: torch.nn.MultiheadAttention, query_from: str, key_from: str, zero_qk: bool = False):
    """A copy of `attn` whose query/key projections are taken from the q, k (or zeroed) slices of the original."""
    width = attn.embed_dim
    weight, bias = attn.in_proj_weight.detach(), attn.in_proj_bias.detach()
    slices = {"q": slice(0, width), "k": slice(width, 2 * width)}
    clone = copy.deepcopy(attn)
    with torch.no_grad():
        for target, source in (("q", query_from), ("k", key_from)):
            clone.in_proj_weight[slices[target]] = 0.0 if zero_qk else weight[slices[source]]
            clone.in_proj_bias[slices[target]] = 0.0 if zero_qk else bias[slices[source]]
    return clone


def _prior_loops(grid_hw: tuple[int, int], std: float) -> torch.Tensor:
    """NACLIP's Gaussian prior written out with loops (CLS row/column 0)."""
    h, w = grid_hw
    prior = torch.zeros(1 + h * w, 1 + h * w)
    for i in range(h * w):
        for j in range(h * w):
            distance2 = (i // w - j // w) ** 2 + (i % w - j % w) ** 2
            prior[1 + i, 1 + j] = math.exp(-distance2 / (2 * std * std))
    return prior


def _reference(model: torch.nn.Module, pixels: torch.Tensor, backend: str, std: float = 5.0,
               proxy: torch.Tensor | None = None, beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """Patch features [B, D, h, w] from the paper equations, through open_clip's modules.

    The tokens enter through `clip_dense.embed_tokens` (position interpolation for the non-square 8 x 6 grid, which
    exposes row/column mix-ups in the prior; it equals open_clip's resized model, `test_clip.py`).
    """
    visual = model.visual
    tokens, _ = clip_dense.embed_tokens(visual, pixels)
    for block in visual.transformer.resblocks[:-1]:
        tokens = block(tokens)
    last = visual.transformer.resblocks[-1]
    normed = last.ln_1(tokens)
    grid = (pixels.shape[-2] // 8, pixels.shape[-1] // 8)

    def run(query_from: str, key_from: str, mask: torch.Tensor | None = None, inputs=normed, zero_qk=False):
        attn = _rewired(last.attn, query_from, key_from, zero_qk)
        return attn(inputs, inputs, inputs, attn_mask=mask, need_weights=False)[0]

    if backend == "sclip":  # out_proj(A1 v) + out_proj(A2 v) counts the output bias twice
        y = tokens + run("q", "q") + run("k", "k") - last.attn.out_proj.bias
        out = (y + last.mlp(last.ln_2(y)))[:, 1:]
    elif backend == "clearclip":
        out = run("q", "q")[:, 1:]
    elif backend == "naclip":
        out = run("k", "k", mask=_prior_loops(grid, std))[:, 1:]
    else:  # proxyclip: zero q/k projections make q.k = 0, so the additive mask alone is the attention logit
        out = []
        for index in range(pixels.shape[0]):
            f = F.normalize(proxy[index].flatten(1).T, dim=-1)
            similarity = f @ f.T
            logits = gamma * (similarity - beta * similarity.mean())
            logits[(logits < 0) & ~torch.eye(len(f), dtype=torch.bool)] = float("-inf")
            out.append(run("q", "k", mask=logits, inputs=normed[index:index + 1, 1:], zero_qk=True))
        out = torch.cat(out)
    feats = F.normalize(visual.ln_post(out) @ visual.proj, dim=-1)
    return feats.transpose(1, 2).reshape(pixels.shape[0], -1, *grid)


def test_gaussian_prior_hand_checked() -> None:
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, math.exp(-0.5)], [0.0, math.exp(-0.5), 1.0]])
    torch.testing.assert_close(clip_dense.gaussian_prior((1, 2), std=1.0), expected)
    torch.testing.assert_close(clip_dense.gaussian_prior((3, 4), std=2.0), _prior_loops((3, 4), 2.0))


def test_proxy_attention_hand_checked() -> None:
    # tokens 0 and 1 share a direction, token 2 is orthogonal: S = [[1,1,0],[1,1,0],[0,0,1]], mean 5/9;
    # 3 * (S - 1.2 * 5/9) = [[1,1,-2],[1,1,-2],[-2,-2,1]] -> negatives masked -> rows [.5,.5,0], [.5,.5,0], [0,0,1]
    features = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]).view(1, 2, 1, 3)
    weights = clip_dense.proxy_attention(features, beta=1.2, gamma=3.0)
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(weights[0, 0], expected)
    # constant features: every similarity is below 1.2 * mean, only the kept diagonal survives (no NaN)
    constant = clip_dense.proxy_attention(torch.ones(1, 4, 2, 2), beta=1.2, gamma=3.0)
    torch.testing.assert_close(constant[0, 0], torch.eye(4))


def test_self_attention_hand_checked() -> None:
    same = torch.ones(1, 1, 4, 2)  # identical rows: uniform attention
    torch.testing.assert_close(clip_dense.self_attention(same, 1.0), torch.full((1, 1, 4, 4), 0.25))
    apart = 50.0 * torch.eye(3).view(1, 1, 3, 3)  # orthogonal, large: each token attends to itself
    torch.testing.assert_close(clip_dense.self_attention(apart, 1.0), torch.eye(3).view(1, 1, 3, 3))


@pytest.mark.parametrize("backend", ["sclip", "clearclip", "naclip"])
def test_backend_matches_equations_through_open_clip_attention(toy_clip: Clip, backend: str) -> None:
    clip = Clip(toy_clip.model, ClipConfig(model_name="toy-vit", dense=backend, naclip_std=3.0), "x")
    pixels = _pixels()
    patch, cls = clip.dense_features(pixels)
    assert patch.shape == (2, 128, 8, 6) and patch.dtype == torch.float32
    torch.testing.assert_close(patch, _reference(toy_clip.model, pixels, backend, std=3.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, toy_clip.encode_image(pixels))  # the CLS path is never rewired
    maskclip, _ = toy_clip.dense_features(pixels)
    assert (patch - maskclip).abs().max() > 1e-2  # the backend really changes the features


def test_proxyclip_matches_equations_with_toy_dinov2(toy_clip: Clip) -> None:
    cfg = ClipConfig(model_name="toy-vit", dense="proxyclip", proxy=Dinov2Config(name="toy", device="cpu"))
    clip = Clip.build(cfg)
    assert clip.identity == "open_clip:toy-vit@random-init:seed=0+proxy=dinov2:toy@random-init:seed=0"
    pixels = _pixels(seed=1)
    proxy = clip.proxy_features(pixels)
    assert proxy.shape == (2, 64, 8, 6)  # the DINOv2 (patch 14) ran on 112 x 84 so that its grid is CLIP's
    patch, _ = clip.dense_features(pixels)
    torch.testing.assert_close(patch, _reference(clip.model, pixels, "proxyclip", proxy=proxy), atol=1e-5, rtol=1e-5)


def test_sliding_features_use_the_backend(toy_clip: Clip) -> None:
    import numpy as np

    image = np.random.default_rng(0).integers(0, 256, size=(80, 72, 3), dtype=np.uint8)
    clear = Clip(toy_clip.model, ClipConfig(model_name="toy-vit", dense="clearclip"), "x")
    single = clear.sliding_dense(image, crop=80, stride=80)  # one crop = the whole padded canvas
    canvas = clear.prepare_canvas(image, crop=80, stride=80)
    expected, _ = clear.dense_features(canvas.pixels)
    torch.testing.assert_close(single.features, expected[0, :, :10, :9])


def test_dense_knob_is_checked_on_the_driver() -> None:
    assert build_config(ClipConfig, None, "pseudolabel.clip").dense == "maskclip"
    with pytest.raises(ConfigError, match="pseudolabel.clip.dense"):
        build_config(ClipConfig, {"dense": "sclipp"}, "pseudolabel.clip")
    with pytest.raises(ConfigError, match="pseudolabel.clip: dense=proxyclip needs a proxy model"):
        build_config(ClipConfig, {"dense": "proxyclip"}, "pseudolabel.clip")
    cfg = build_config(ClipConfig, {"dense": "proxyclip", "proxy": {"name": "toy"}}, "pseudolabel.clip")
    assert cfg.proxy == Dinov2Config(name="toy")
    assert clip_identity(ClipConfig(dense="sclip")) == clip_identity(ClipConfig())  # no second model loaded
