"""CLIP wrapper against references computed from open_clip's own modules on the tiny ``toy-vit``."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from pipeline.models import clip_dense
from pipeline.models.clip import Clip, ClipConfig
from pipeline.models.preprocess import CLIP_MEAN, CLIP_STD, resize_shape, to_normalized_tensor
from pipeline.models.sliding import patch_centers, window_starts


def _reference_dense(model: torch.nn.Module, pixels: torch.Tensor, residual_mlp: bool) -> torch.Tensor:
    """MaskCLIP features via open_clip's forward with a diagonal attention mask (each token attends to itself)."""
    visual = model.visual
    tokens = visual._embeds(pixels)
    for block in visual.transformer.resblocks[:-1]:
        tokens = block(tokens)
    last = visual.transformer.resblocks[-1]
    diagonal = torch.full((tokens.shape[1],) * 2, float("-inf"))
    diagonal.fill_diagonal_(0.0)
    if residual_mlp:
        out = last(tokens, attn_mask=diagonal)
    else:
        normed = last.ln_1(tokens)
        out = last.attn(normed, normed, normed, attn_mask=diagonal, need_weights=False)[0]
    feats = F.normalize(visual.ln_post(out[:, 1:]) @ visual.proj, dim=-1)
    grid_h, grid_w = pixels.shape[-2] // 8, pixels.shape[-1] // 8
    return feats.transpose(1, 2).reshape(pixels.shape[0], -1, grid_h, grid_w)


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_properties_and_identity(toy_clip: Clip) -> None:
    assert (toy_clip.image_size, toy_clip.patch_size, toy_clip.embed_dim) == (64, 8, 128)
    assert toy_clip.identity == "open_clip:toy-vit@random-init:seed=0"
    assert toy_clip.mean == pytest.approx(CLIP_MEAN) and toy_clip.std == pytest.approx(CLIP_STD)


def test_random_init_is_seeded(toy_clip: Clip) -> None:
    same = Clip.build(ClipConfig(model_name="toy-vit"))
    other = Clip.build(ClipConfig(model_name="toy-vit", init_seed=1))
    weight = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.equal(same.model.state_dict()[weight], toy_clip.model.state_dict()[weight])
    assert not torch.equal(other.model.state_dict()[weight], toy_clip.model.state_dict()[weight])


@torch.no_grad()
def test_bf16_weights_give_float32_outputs_close_to_fp32(toy_clip: Clip) -> None:
    half = Clip.build(ClipConfig(model_name="toy-vit", precision="bf16"))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    patch, cls = half.dense_features(pixels)
    assert patch.dtype == cls.dtype == torch.float32
    assert ((cls * toy_clip.encode_image(pixels)).sum(dim=-1) > 0.98).all()


@torch.no_grad()
def test_encode_image_and_dense_cls_equal_open_clip(toy_clip: Clip) -> None:
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = F.normalize(toy_clip.model.encode_image(pixels), dim=-1)
    torch.testing.assert_close(toy_clip.encode_image(pixels), reference, atol=1e-5, rtol=1e-5)
    _, cls = toy_clip.dense_features(pixels)
    torch.testing.assert_close(cls, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("residual_mlp", [True, False])
@torch.no_grad()
def test_dense_features_match_diagonal_attention_reference(toy_clip: Clip, residual_mlp: bool) -> None:
    clip = Clip(toy_clip.model, ClipConfig(model_name="toy-vit", dense_residual_mlp=residual_mlp), "x")
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    patch, _ = clip.dense_features(pixels)
    assert patch.shape == (2, 128, 8, 8)
    torch.testing.assert_close(patch, _reference_dense(toy_clip.model, pixels, residual_mlp), atol=1e-5, rtol=1e-5)
    assert torch.allclose(patch.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)


@torch.no_grad()
def test_non_native_size_matches_open_clip_resized_model(toy_clip: Clip) -> None:
    """Our bicubic position-embedding interpolation equals open_clip's checkpoint resize (no antialias), 96x80."""
    resized = open_clip.create_model("toy-vit", force_image_size=(96, 80)).eval()
    state = {k: v.clone() for k, v in toy_clip.model.state_dict().items()}
    open_clip.model.resize_pos_embed(state, resized, antialias=False)  # MaskCLIP (mmseg resize) has no antialias
    resized.load_state_dict(state)
    pixels = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(2))
    patch, cls = toy_clip.dense_features(pixels)
    torch.testing.assert_close(cls, F.normalize(resized.encode_image(pixels), dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patch, _reference_dense(resized, pixels, True), atol=1e-5, rtol=1e-5)


def test_pixels_must_be_patch_multiples(toy_clip: Clip) -> None:
    with pytest.raises(ValueError, match="patch size"):
        toy_clip.dense_features(torch.zeros(1, 3, 60, 64))


def test_unsupported_visual_tower_is_rejected() -> None:
    with pytest.raises(NotImplementedError, match="VisionTransformer"):
        clip_dense.check_supported(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_encode_text_is_normalised_template_mean(toy_clip: Clip) -> None:
    names, templates = ["cat", "traffic light"], ["a photo of a {}.", "art of the {}."]
    tokenizer = open_clip.get_tokenizer("toy-vit")
    per_template = [
        F.normalize(toy_clip.model.encode_text(tokenizer([t.format(n) for n in names])), dim=-1) for t in templates
    ]
    expected = F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)
    text = toy_clip.encode_text(names, templates)
    torch.testing.assert_close(text, expected, atol=1e-5, rtol=1e-5)
    text.zero_()  # the caller's copy; the cache must be unaffected
    torch.testing.assert_close(toy_clip.encode_text(names, templates), expected, atol=1e-5, rtol=1e-5)
    single = toy_clip.encode_text(names, templates[:1])
    torch.testing.assert_close(single, per_template[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_clips_of_the_same_weights_encode_prompts_once_whatever_their_dense_backend(monkeypatch) -> None:
    names, templates = ("sky", "road", "tree"), ("a photo of a {}.", "a bad photo of the {}.", "art of the {}.")
    encoded: list[int] = []
    encode_prompts = Clip._encode_prompts
    monkeypatch.setattr(Clip, "_encode_prompts", lambda self, prompts: encoded.append(len(prompts))
                        or encode_prompts(self, prompts))
    maskclip = Clip.build(ClipConfig(model_name="toy-vit", init_seed=5))
    naclip = Clip.build(ClipConfig(model_name="toy-vit", init_seed=5, dense="naclip"))
    expected = maskclip.encode_text(names, templates)
    assert sum(encoded) == 9
    expected.zero_()  # the caller's copy; neither cache may see it
    torch.testing.assert_close(naclip.encode_text(names, templates), maskclip.encode_text(names, templates))
    assert sum(encoded) == 9 and naclip.encode_text(names, templates).abs().sum() > 0
    # other weights, another precision, or a model wrapped by hand encode for themselves
    other_seed = Clip.build(ClipConfig(model_name="toy-vit", init_seed=6))
    bf16 = Clip.build(ClipConfig(model_name="toy-vit", init_seed=5, precision="bf16"))
    by_hand = Clip(maskclip.model, maskclip.cfg, maskclip.identity)
    for clip in (other_seed, bf16, by_hand):
        clip.encode_text(names, templates)
    assert sum(encoded) == 36
    assert not torch.allclose(other_seed.encode_text(names, templates), maskclip.encode_text(names, templates))


@torch.no_grad()
def test_classify_crops_is_100_cosine(toy_clip: Clip) -> None:
    crops = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    image = toy_clip.encode_image(crops)
    logits = toy_clip.classify_crops(crops, 2.0 * image)  # text features are renormalised
    torch.testing.assert_close(logits, 100.0 * image @ image.T, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits.diagonal(), torch.full((3,), 100.0), atol=1e-3, rtol=0)


@torch.no_grad()
def test_sliding_single_crop_equals_dense(toy_clip: Clip) -> None:
    image = _random_image(64, 64)
    result = toy_clip.sliding_dense(image, crop=64, stride=32)
    patch, cls = toy_clip.dense_features(toy_clip.preprocess(image))
    torch.testing.assert_close(result.features, patch[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.crop_cls, cls, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(result.crop_boxes, [[0, 0, 64, 64]])
    assert result.patch_stride_px == 8.0 and result.image_hw == (64, 64)


@torch.no_grad()
def test_sliding_overlap_is_averaged(toy_clip: Clip) -> None:
    image = _random_image(64, 96, seed=1)
    result = toy_clip.sliding_dense(image, crop=64, stride=32)
    pixels = toy_clip.preprocess(image)
    left, _ = toy_clip.dense_features(pixels[..., 0:64])
    right, _ = toy_clip.dense_features(pixels[..., 32:96])
    np.testing.assert_array_equal(result.crop_boxes, [[0, 0, 64, 64], [32, 0, 96, 64]])
    assert result.features.shape == (128, 8, 12)
    torch.testing.assert_close(result.features[:, :, :4], left[0, :, :, :4], atol=1e-5, rtol=1e-5)
    overlap = F.normalize(left[0, :, :, 4:] + right[0, :, :, :4], dim=0)
    torch.testing.assert_close(result.features[:, :, 4:8], overlap, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.features[:, :, 8:], right[0, :, :, 4:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sliding_pads_small_images_and_scales(toy_clip: Clip) -> None:
    image = _random_image(30, 40, seed=2)
    result = toy_clip.sliding_dense(image, crop=64, stride=32)
    padded = F.pad(toy_clip.preprocess(image), (0, 24, 0, 34))
    patch, _ = toy_clip.dense_features(padded)
    assert result.features.shape == (128, 4, 5)  # ceil(30 / 8) x ceil(40 / 8)
    torch.testing.assert_close(result.features, patch[0, :, :4, :5], atol=1e-5, rtol=1e-5)

    scaled = toy_clip.sliding_dense(_random_image(32, 48, seed=3), crop=64, stride=32, scale=2.0)
    assert scaled.patch_stride_px == 4.0 and scaled.features.shape == (128, 8, 12)
    np.testing.assert_array_equal(scaled.crop_boxes, [[0, 0, 32, 32], [16, 0, 48, 32]])
    assert scaled.centers()[0, 1].tolist() == [6.0, 2.0]


@torch.no_grad()
def test_crops_of_several_images_share_encoder_calls_without_changing_features(toy_clip: Clip) -> None:
    """Batched across images (crop batches straddling images) = each image alone, and = the definition."""
    from dataclasses import replace

    images = [_random_image(50, 70, seed=4), _random_image(90, 40, seed=5), _random_image(20, 20, seed=6)]
    small_batches = Clip(toy_clip.model, replace(toy_clip.cfg, image_batch_size=3), toy_clip.identity)
    canvases = [small_batches.prepare_canvas(image, 64, 32, 48 / min(image.shape[:2])) for image in images]
    assert [len(c.boxes) for c in canvases] == [2, 3, 1]  # both calls of 3 crops mix images
    batched = small_batches.sliding_features(canvases)
    for image, canvas, feats in zip(images, canvases, batched, strict=True):
        alone = toy_clip.sliding_dense(image, 64, 32, canvas.scale)
        torch.testing.assert_close(feats.features, alone.features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(feats.crop_cls, alone.crop_cls, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(feats.crop_boxes, alone.crop_boxes)
        assert (feats.patch_stride_px, feats.image_hw) == (alone.patch_stride_px, image.shape[:2])
        patch, cls = toy_clip.dense_features(torch.cat([canvas.pixels[:, :, y0:y1, x0:x1]
                                                        for x0, y0, x1, y1 in canvas.boxes]))
        torch.testing.assert_close(feats.crop_cls, cls, atol=1e-5, rtol=1e-5)
    assert small_batches.sliding_features([]) == []


def test_sliding_geometry_must_align_with_patches(toy_clip: Clip) -> None:
    with pytest.raises(ValueError, match="multiples of the patch size"):
        toy_clip.sliding_dense(_random_image(64, 64), crop=60, stride=32)


def test_patch_centers_and_window_starts() -> None:
    centers = patch_centers((2, 3), 8.0)
    assert centers.shape == (2, 3, 2)
    assert centers[0].tolist() == [[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]]
    assert centers[1, 2].tolist() == [20.0, 12.0]
    assert window_starts(100, 64, 32) == [0, 32, 36]
    assert window_starts(96, 64, 32) == [0, 32]
    assert window_starts(64, 64, 32) == [0]


def test_preprocess_normalises_and_resizes() -> None:
    image = np.full((10, 20, 3), 255, dtype=np.uint8)
    tensor = to_normalized_tensor(image)
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert tensor.shape == (1, 3, 10, 20)
    torch.testing.assert_close(tensor[0, :, 3, 7], expected)
    assert to_normalized_tensor(image, size=8, resize_mode="shortest").shape == (1, 3, 8, 16)
    assert resize_shape((100, 200), 50, "longest") == (25, 50)
    assert resize_shape((100, 200), 50, "square") == (50, 50)
    assert resize_shape((100, 200), (30, 40), "square") == (30, 40)
    with pytest.raises(ValueError, match="uint8"):
        to_normalized_tensor(image.astype(np.float32))
