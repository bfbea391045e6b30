"""ZegCLIP method: frozen/trainable split, shapes, DPT composition, RD, decoder scores, NEL, transductive labels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods import zegclip as zegclip_module
from pipeline.methods.zegclip import ZegCLIPConfig, ZegCLIPMethod, poly_warmup_lr, pseudo_label_unseen
from pipeline.methods.zegclip_backbone import DeepPromptViT
from pipeline.methods.zegclip_decoder import RelationshipDescriptor, ZegDecoder
from pipeline.methods.zegclip_loss import nel_loss

TINY_CLIP = {  # real open_clip architecture, tiny sizes: 32 px, patch 8 -> 4x4 tokens, D = 32
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_CFG = {"num_prompts": 3, "decoder_heads": 4, "decoder_ffn_dim": 64}



@pytest.fixture(scope="module")
def clip_model() -> torch.nn.Module:
    open_clip = pytest.importorskip("open_clip")
    from open_clip import factory

    factory._MODEL_CONFIGS["zegclip-test-vit"] = TINY_CLIP
    torch.manual_seed(0)
    return open_clip.create_model("zegclip-test-vit", pretrained=None).eval()


def make_method(clip_model: torch.nn.Module, num_classes: int = 5, seen: tuple = (0, 1, 2), unseen: tuple = (3, 4),
                ignore_index: int = 255, **overrides: object) -> ZegCLIPMethod:
    torch.manual_seed(1)
    cfg = ZegCLIPConfig(**{**TINY_CFG, **overrides})
    text = F.normalize(torch.randn(num_classes, 32), dim=-1)
    return ZegCLIPMethod(cfg, clip_model, text, list(seen), list(unseen), ignore_index)


def test_class_255_is_supervised_when_the_vocabulary_ignores_65535(clip_model: torch.nn.Module) -> None:
    """More than 255 classes: uint16 maps, 65535 = unlabelled (the crop padding too), 255 an ordinary class."""
    method = make_method(clip_model, num_classes=300, seen=(254, 255), unseen=(299,), ignore_index=65535)
    labels = torch.full((1, 32, 32), 65535)
    labels[:, :16] = 255
    _, logs = method.loss(method.build_model(), {"pixels": torch.randn(1, 3, 32, 32), "labels": labels},
                          step=0, total_steps=10)
    assert logs["num_masks"] == 1  # class 255's mask; with 255 as the ignore id nothing would be supervised
    assert method.visible_labels(labels, keep_unseen=False).eq(labels).all()


def test_only_prompts_decoder_and_query_projection_are_trainable(clip_model: torch.nn.Module) -> None:
    method = make_method(clip_model)
    model = method.build_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        name.startswith(("backbone.prompt_", "relationship.q_proj.", "decoder.")) for name in trainable
    )
    expected_prompt_params = {"backbone.prompt_embeddings",
                              "backbone.prompt_proj.weight", "backbone.prompt_norm.bias"}
    assert expected_prompt_params <= set(trainable)
    assert not any(p.requires_grad for p in model.backbone.visual.parameters())
    grouped = [p for group in method.param_groups(model) for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert all(group["lr"] == pytest.approx(2e-4) for group in method.param_groups(model))


def test_optimiser_step_changes_prompts_but_not_clip(clip_model: torch.nn.Module) -> None:
    method = make_method(clip_model)
    model = method.build_model().train()
    frozen_before = {k: v.clone() for k, v in model.backbone.visual.state_dict().items()}
    caller_before = {k: v.clone() for k, v in clip_model.visual.state_dict().items()}
    prompts_before = model.backbone.prompt_embeddings.detach().clone()
    optimiser = torch.optim.AdamW(method.param_groups(model))
    batch = {"pixels": torch.randn(2, 3, 32, 32), "labels": torch.randint(0, 5, (2, 32, 32))}
    loss, _ = method.loss(model, batch, step=0, total_steps=10)
    loss.backward()
    optimiser.step()
    for key, value in model.backbone.visual.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    for key, value in clip_model.visual.state_dict().items():
        assert torch.equal(value, caller_before[key]), key
    assert not torch.equal(model.backbone.prompt_embeddings.detach(), prompts_before)


def test_output_shapes_and_normalisation(clip_model: torch.nn.Module) -> None:
    method = make_method(clip_model)
    model = method.build_model().eval()
    pixels = torch.randn(2, 3, 48, 32)  # non-square: 6x4 token grid, position table resized
    patches, global_embedding = model.backbone(pixels)
    assert patches.shape == (2, 32, 6, 4) and global_embedding.shape == (2, 32)
    assert torch.allclose(patches.norm(dim=1), torch.ones(2, 6, 4), atol=1e-5)
    assert torch.allclose(global_embedding.norm(dim=1), torch.ones(2), atol=1e-5)
    assert model(pixels, method.seen_ids).shape == (2, 3, 6, 4)
    assert method.predict_logits(model, pixels).shape == (2, 5, 48, 32)


def test_without_prompts_the_tower_equals_open_clip(clip_model: torch.nn.Module) -> None:
    """With no prompted layer the composed forward reproduces open_clip's own image embedding (extra LN aside)."""
    import copy

    pixels = torch.randn(2, 3, 32, 32)
    plain = DeepPromptViT(copy.deepcopy(clip_model.visual), num_prompts=3, prompt_layers=[]).eval()
    prompted = DeepPromptViT(copy.deepcopy(clip_model.visual), num_prompts=3).eval()
    expected = F.normalize(clip_model.visual(pixels), dim=-1)
    assert torch.allclose(plain(pixels)[1], expected, atol=1e-4)
    assert not torch.allclose(prompted(pixels)[1], expected, atol=1e-3)


def test_prompt_init_bound_and_layer_selection(clip_model: torch.nn.Module) -> None:
    import copy

    backbone = DeepPromptViT(copy.deepcopy(clip_model.visual), num_prompts=7, prompt_layers=[1])
    assert backbone.prompt_embeddings.shape == (1, 7, 64)
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 64))
    assert backbone.prompt_embeddings.abs().max() <= bound
    with pytest.raises(ValueError, match="prompt_layers"):
        DeepPromptViT(copy.deepcopy(clip_model.visual), prompt_layers=[2])


def test_relationship_descriptor_is_linear_of_hadamard_and_text() -> None:
    torch.manual_seed(0)
    descriptor = RelationshipDescriptor(4)
    text, image = torch.randn(3, 4), torch.randn(2, 4)
    queries = descriptor(text, image)
    weight, bias = descriptor.q_proj.weight, descriptor.q_proj.bias
    for b in range(2):
        for m in range(3):
            expected = weight @ torch.cat([text[m] * image[b], text[m]]) + bias
            assert torch.allclose(queries[b, m], expected, atol=1e-6)


def test_decoder_logits_are_last_layer_head_mean_scores() -> None:
    torch.manual_seed(0)
    decoder = ZegDecoder(dim=8, num_layers=2, num_heads=2, ffn_dim=16).eval()
    queries, patches = torch.randn(1, 3, 8), torch.randn(1, 8, 2, 3)
    logits, _ = decoder(queries, patches)
    memory = patches.flatten(2).transpose(1, 2)
    refined, _ = decoder.layers[0](queries, memory)
    attention = decoder.layers[1].cross_attn
    q, k = attention.q(refined).reshape(1, 3, 2, 4), attention.k(memory).reshape(1, 6, 2, 4)
    scores = torch.einsum("bmhc,bnhc->bmn", q, k) / 2 / math.sqrt(4)  # mean over 2 heads, scale 1/sqrt(d_h)
    assert logits.shape == (1, 3, 2, 3)
    assert torch.allclose(logits.flatten(2), scores, atol=1e-5)


def loop_nel(logits: torch.Tensor, target: torch.Tensor, class_ids: list[int], alpha: float = 0.25,
             gamma: float = 2.0) -> tuple[float, float]:
    """Direct per-pixel definition (release semantics), returning (focal, dice) before weighting."""
    batch, num_queries, height, width = logits.shape
    focal_sum, dice_sum, num_masks = 0.0, 0.0, 0
    for b in range(batch):
        for j, class_id in enumerate(class_ids):
            pixel_losses, inter, prob_sum, pos_sum = [], 0.0, 0.0, 0.0
            for y in range(height):
                for x in range(width):
                    prob = 1 / (1 + math.exp(-float(logits[b, j, y, x])))
                    positive = 1.0 if int(target[b, y, x]) == class_id else 0.0
                    p_t = prob if positive else 1 - prob
                    alpha_t = alpha if positive else 1 - alpha
                    pixel_losses.append(-alpha_t * (1 - p_t) ** gamma * math.log(p_t))
                    inter, prob_sum, pos_sum = inter + prob * positive, prob_sum + prob, pos_sum + positive
            focal_sum += sum(pixel_losses) / len(pixel_losses)
            if pos_sum > 0:
                num_masks += 1
                dice_sum += 1 - (2 * inter + 1) / (prob_sum + pos_sum + 1)
    num_masks = max(num_masks, 1)
    return focal_sum / num_masks, dice_sum / num_masks


def test_nel_matches_direct_loop() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5) * 2
    target = torch.tensor([[7, 7, 2, 2, 255], [7, 2, 255, 9, 9], [0, 0, 0, 0, 0], [255, 255, 7, 7, 2]] * 2)
    target = target.reshape(2, 4, 5)
    target[1] = torch.where(target[1] == 2, torch.full_like(target[1], 255), target[1])  # image 1 has no class 2
    class_ids = [7, 2, 5]  # 5 is absent, 0 and 9 are not queries -> negatives everywhere
    loss, parts = nel_loss(logits, target, class_ids, focal_weight=100.0, dice_weight=1.0)
    focal, dice = loop_nel(logits, target, class_ids)
    assert parts["num_masks"].item() == 3  # image 0: {7, 2}, image 1: {7}
    assert parts["focal"].item() == pytest.approx(focal, rel=1e-5)
    assert parts["dice"].item() == pytest.approx(dice, rel=1e-5)
    assert loss.item() == pytest.approx(100 * focal + dice, rel=1e-5)


def test_nel_hand_computed_single_pixel() -> None:
    loss, parts = nel_loss(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long), [0])
    focal = 0.25 * 0.25 * math.log(2)  # alpha * (1 - 0.5)^2 * BCE(0.5)
    dice = 1 - (2 * 0.5 + 1) / (0.5 + 1 + 1)
    assert parts["focal"].item() == pytest.approx(focal)
    assert loss.item() == pytest.approx(100 * focal + dice)


def test_ignored_pixels_are_negatives_in_focal_term() -> None:
    target = torch.tensor([[[0, 255], [255, 255]]])
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    loss, parts = nel_loss(logits, target, [0, 1])
    loss.backward()
    ignored = target[0] == 255
    assert (logits.grad[0, :, ignored] > 0).all()  # descent lowers every class score on ignored pixels
    assert logits.grad[0, 0, 0, 0] < 0  # the labelled pixel is a positive of class 0
    lower, _ = nel_loss(torch.full((1, 2, 2, 2), -3.0), target, [0, 1])
    higher, _ = nel_loss(torch.full((1, 2, 2, 2), 3.0), target, [0, 1])
    assert parts["num_masks"].item() == 1 and higher.item() > lower.item()
    _, empty = nel_loss(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 255), [0, 1])
    assert empty["num_masks"].item() == 1 and empty["focal"].item() > 0 and empty["dice"].item() == 0


class FixedLogits(torch.nn.Module):
    """Stand-in model: logits [B, M_q, 2, 2] that prefer class 4 among the unseen classes everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls: list[list[int]] = []

    def forward(self, pixels: torch.Tensor, query_ids: torch.Tensor | None) -> torch.Tensor:
        ids = query_ids.tolist()
        self.calls.append(ids)
        per_class = torch.tensor([0.5 if c == 4 else -0.5 for c in ids])
        return self.scale * per_class.view(1, -1, 1, 1).expand(pixels.shape[0], -1, 2, 2)


def test_transductive_pseudo_labels_only_on_unseen_pixels_from_switch(clip_model: torch.nn.Module,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    method = make_method(clip_model, mode="transductive", st_start_fraction=0.5, st_focal_weight=20.0)
    captured: list[tuple[torch.Tensor, list[int], float]] = []

    def spy(logits, target, class_ids, ignore_index, focal_weight, *args):
        captured.append((target.clone(), [int(c) for c in class_ids], focal_weight))
        return nel_loss(logits, target, class_ids, ignore_index, focal_weight, *args)

    monkeypatch.setattr(zegclip_module, "nel_loss", spy)
    labels = torch.tensor([[[0, 3], [255, 9]]])  # seen 0, unseen 3, ignore, out-of-vocabulary 9
    batch = {"pixels": torch.zeros(1, 3, 2, 2), "labels": labels}
    model = FixedLogits()
    _, logs_before = method.loss(model, batch, step=4, total_steps=10)
    _, logs_after = method.loss(model, batch, step=5, total_steps=10)
    (before, ids_before, weight_before), (after, ids_after, weight_after) = captured
    assert logs_before["self_training"].item() == 0 and logs_after["self_training"].item() == 1
    assert ids_before == [0, 1, 2] and weight_before == 100.0
    assert before.tolist() == [[[0, 255], [255, 255]]]
    assert ids_after == [0, 1, 2, 3, 4] and weight_after == 20.0
    assert after.tolist() == [[[0, 4], [255, 255]]]  # only the unseen-GT pixel is rewritten
    assert labels.tolist() == [[[0, 3], [255, 9]]]  # the batch itself is not modified


def test_pseudo_label_argmax_over_unseen_only() -> None:
    logits = torch.tensor([9.0, 1.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2)  # seen class 0 scores highest
    labels = torch.tensor([[[2, 0]]])
    out = pseudo_label_unseen(logits, labels, torch.tensor([0, 5, 2]), torch.tensor([5, 2]))
    assert out.tolist() == [[[2, 0]]]


def test_schedule_and_seen_penalty(clip_model: torch.nn.Module) -> None:
    assert poly_warmup_lr(0, 100, 1.0, min_lr=0.0, warmup_iters=10, warmup_ratio=1e-6) == pytest.approx(1e-6)
    assert poly_warmup_lr(10, 100, 1.0, min_lr=0.0, warmup_iters=10) == pytest.approx(0.9**0.9)
    assert poly_warmup_lr(100, 100, 1.0, min_lr=1e-6, warmup_iters=10) == pytest.approx(1e-6)
    inductive = make_method(clip_model, warmup_iters=10)
    transductive = make_method(clip_model, warmup_iters=10, mode="transductive")
    assert inductive.learning_rate(40, 100, 1.0) == transductive.learning_rate(40, 100, 1.0)
    assert transductive.learning_rate(50, 100, 1.0) == pytest.approx(1e-6)  # warmup restarts at the switch
    assert transductive.learning_rate(60, 100, 1.0) == pytest.approx((1 - 1e-6) * 0.8**0.9 + 1e-6)
    assert inductive.eval_seen_penalty == 0.1 and transductive.eval_seen_penalty == 0.0
    from pipeline.methods.registry import BuiltMethod, ZegCLIPPredictor  # what the eval stage scores with

    served = [ZegCLIPPredictor(BuiltMethod(m, m.build_model())).seen_penalty for m in (inductive, transductive)]
    assert served == [0.1, 0.0]


def coloured_squares(num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of 16x16 quadrants coloured blue/red/green by class (0, 1, 2); labels [N, 32, 32]."""
    generator = torch.Generator().manual_seed(0)
    colours = torch.tensor([[30.0, 30, 230], [230, 30, 30], [30, 230, 30]])
    labels = torch.randint(0, 3, (num_images, 2, 2), generator=generator)
    labels = labels.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    return colours[labels].permute(0, 3, 1, 2), labels


def test_tiny_overfit_on_coloured_squares(clip_model: torch.nn.Module) -> None:
    method = make_method(clip_model, num_classes=3, seen=(0, 1, 2), unseen=(), lr=3e-4, warmup_iters=0)
    model = method.build_model()
    optimiser = torch.optim.AdamW(method.param_groups(model))
    images, labels = coloured_squares(4)
    batch = {"pixels": method.normalise(images), "labels": labels}
    initial_accuracy = (method.predict_logits(model.eval(), batch["pixels"]).argmax(dim=1) == labels).float().mean()
    model.train()
    losses = []
    for step in range(50):
        loss, _ = method.loss(model, batch, step=step, total_steps=50)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    accuracy = (method.predict_logits(model.eval(), batch["pixels"]).argmax(dim=1) == labels).float().mean()
    assert initial_accuracy.item() < 0.5  # this seed starts with the colours mapped to the wrong classes
    assert accuracy.item() > 0.95
    assert losses[-1] < 0.3 * losses[0]


def test_learnable_parameters_match_release_count_on_vit_b16() -> None:
    """ViT-B/16, 10 prompts: the release reports 13.8M learnable parameters, which include the never-executed
    self-attention of its 3 nn.TransformerDecoderLayers (3 x 1,050,624); without them 10,666,240 remain."""
    open_clip = pytest.importorskip("open_clip")
    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    method = ZegCLIPMethod(ZegCLIPConfig(num_prompts=10), clip, torch.randn(20, 512), range(15), range(15, 20))
    model = method.build_model()
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    unused_self_attention = 3 * (4 * 512 * 512 + 4 * 512)
    assert learnable == 10_666_240
    assert round((learnable + unused_self_attention) / 1e6, 1) == 13.8


def test_low_precision_tower_trains_float32_prompts(clip_model: torch.nn.Module) -> None:
    """A bf16 CLIP (as `Clip` builds with precision=bf16) runs frozen in bf16; prompts and outputs stay float32."""
    import open_clip

    low_precision = open_clip.create_model("zegclip-test-vit", pretrained=None, precision="bf16")
    method = make_method(low_precision)
    model = method.build_model()
    batch = {"pixels": torch.randn(2, 3, 32, 32), "labels": torch.randint(0, 5, (2, 32, 32))}
    loss, _ = method.loss(model, batch, step=0, total_steps=10)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.backbone.prompt_embeddings.grad.dtype == torch.float32
    assert model.backbone.visual.conv1.weight.dtype == torch.bfloat16


def _by_hand_deep_prompt_forward(backbone: DeepPromptViT, pixels: torch.Tensor, double_cls: bool
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's `forward_deep_prompt` written out: fresh projected prompts P_l between CLS and the patches at
    every layer's input (the previous layer's prompt outputs dropped), prompt_norm, ln_post, proj."""
    visual = backbone.visual
    patches = visual.conv1(pixels).flatten(2).transpose(1, 2)  # [B, 16, 64]
    cls_position = visual.positional_embedding[0] + (visual.class_embedding if double_cls else 0)
    cls = (visual.class_embedding + cls_position).expand(pixels.shape[0], 1, -1)
    tokens = visual.ln_pre(torch.cat([cls, patches + visual.positional_embedding[1:]], dim=1))
    for layer, block in enumerate(visual.transformer.resblocks):
        prompts = backbone.prompt_proj(backbone.prompt_embeddings[layer]).expand(pixels.shape[0], -1, -1)
        tokens = torch.cat([tokens[:, :1], prompts, tokens[:, -16:]], dim=1)
        tokens = block(tokens) if visual.transformer.batch_first else block(tokens.transpose(0, 1)).transpose(0, 1)
    tokens = visual.ln_post(backbone.prompt_norm(tokens)) @ visual.proj
    patch_map = tokens[:, -16:].transpose(1, 2).reshape(pixels.shape[0], -1, 4, 4)
    return F.normalize(patch_map, dim=1), F.normalize(tokens[:, 0], dim=-1)


@pytest.mark.parametrize("double_cls", [False, True])
def test_deep_prompts_equal_a_by_hand_layer_by_layer_forward(clip_model: torch.nn.Module, double_cls: bool) -> None:
    import copy

    torch.manual_seed(3)
    backbone = DeepPromptViT(copy.deepcopy(clip_model.visual), num_prompts=3,
                             double_cls_embedding=double_cls).eval()
    pixels = torch.randn(2, 3, 32, 32)
    patches, global_embedding = backbone(pixels)
    expected_patches, expected_global = _by_hand_deep_prompt_forward(backbone, pixels, double_cls)
    assert torch.allclose(patches, expected_patches, atol=1e-5)
    assert torch.allclose(global_embedding, expected_global, atol=1e-5)
    other_prompts = copy.deepcopy(backbone)  # every layer's prompts matter: change only the last layer's
    with torch.no_grad():
        other_prompts.prompt_embeddings[-1].add_(1.0)
    assert not torch.allclose(other_prompts(pixels)[0], patches, atol=1e-4)


def test_release_cls_embedding_is_added_twice_by_default(clip_model: torch.nn.Module) -> None:
    method = make_method(clip_model)
    assert method.cfg.double_cls_embedding and method.build_model().backbone.double_cls_embedding
    single = make_method(clip_model, double_cls_embedding=False).build_model().eval()
    double = method.build_model().eval()
    pixels = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(single.backbone(pixels)[1], double.backbone(pixels)[1], atol=1e-4)


def test_release_training_recipe_defaults() -> None:
    cfg = ZegCLIPConfig()
    assert (cfg.augment.min_scale, cfg.augment.max_scale, cfg.augment.long_side_factor) == (0.5, 2.0, 4.0)
    assert cfg.augment.cat_max_ratio == 0.75 and cfg.augment.photometric and cfg.augment.flip_prob == 0.5
    assert cfg.grad_clip is None and cfg.reset_optimizer_at_switch
    from pipeline.config import build_config

    partial = build_config(ZegCLIPConfig, {"augment": {"photometric": False}}, "zegclip")
    assert partial.augment.cat_max_ratio == 0.75 and partial.augment.min_scale == 0.5  # others stay the release's
