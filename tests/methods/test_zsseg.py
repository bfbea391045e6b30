"""ZSSeg (methods-spec §2.1): learned prompts against a hand-assembled prompt, frozen towers, training lowers the
loss, pair sampling and resumable batches, the λ ensemble, mask averaging and per-pixel assembly on hand cases."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.vocab import load_vocab
from pipeline.methods.configs import MethodConfig, ZSSegConfig
from pipeline.methods.zsseg import PromptLearner, ZSSegMethod
from pipeline.methods.zsseg_crops import assemble, crop_features, ensemble, mask_average, with_remainder
from pipeline.methods.zsseg_data import CropFeatures, draw_pairs, feature_batches
from pipeline.models.configs import ClipConfig

NAMES = ["dog", "traffic light", "sky"]



@pytest.fixture(scope="module")
def clip():  # the toy open_clip architecture (text width 128, 77 tokens, causal), random weights
    from pipeline.models.clip import Clip

    return Clip.build(ClipConfig(model_name="toy-vit", pretrained=None, device="cpu"))


def test_learned_prompt_equals_the_hand_assembled_sos_ctx_name_eos_sequence(clip) -> None:
    model, tokenizer = clip.model, clip.tokenizer
    torch.manual_seed(3)
    learner = PromptLearner(model, tokenizer, n_ctx=5)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    expected = []
    for name in NAMES:  # [SOS] ctx_1..5 <name tokens> "." [EOS] 0-padding, full 77 tokens, open_clip's own layers
        ids = tokenizer.encode(f"{name}.")
        token_emb = model.token_embedding.weight
        seq = torch.cat([token_emb[[sot]], learner.ctx.detach(), token_emb[ids], token_emb[[eot]]])
        seq = torch.cat([seq, token_emb[[0] * (77 - len(seq))]])[None] + model.positional_embedding
        out = model.ln_final(model.transformer(seq, attn_mask=model.attn_mask))[0, 1 + 5 + len(ids)]
        expected.append(F.normalize(out @ model.text_projection, dim=-1))
    with torch.no_grad():
        got = learner(NAMES)
    torch.testing.assert_close(got, torch.stack(expected).detach(), atol=1e-5, rtol=1e-5)


def test_context_set_to_word_embeddings_equals_clip_encoding_the_sentence(clip) -> None:
    learner = PromptLearner(clip.model, clip.tokenizer, n_ctx=4)
    prefix = clip.tokenizer(["a photo of the"])[0, 1:5]
    with torch.no_grad():
        learner.ctx.copy_(clip.model.token_embedding(prefix))
        got = learner(NAMES)
        reference = F.normalize(clip.model.encode_text(clip.tokenizer([f"a photo of the {n}." for n in NAMES])), dim=-1)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_context_vectors(clip) -> None:
    from pipeline.methods.registry import METHODS
    from pipeline.train.checkpoints import trainable_state

    cfg = MethodConfig(method="zsseg", clip=ClipConfig(model_name="toy-vit", pretrained=None),
                       zsseg=ZSSegConfig(n_ctx=3))
    built = METHODS["zsseg"].build(cfg, load_vocab("toy"), torch.device("cpu"))
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    masks = np.zeros((2, 40, 48), dtype=bool)
    masks[0, :20], masks[1, 20:] = True, True
    features = crop_features(built.backbone, image, masks)
    loss, logs = built.method.loss(built.model, features, torch.tensor([0, 3]))
    loss.backward()
    assert built.model.ctx.grad is not None and built.model.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in built.backbone.model.parameters())  # image and text towers untouched
    assert set(trainable_state(built.model)) == {"ctx"} and built.model.ctx.shape == (3, 128)
    assert built.method.seen_ids == [0, 1, 2, 3, 4, 6, 7, 8, 11]  # toy: tree, dog, boat are unseen
    assert 0.0 <= logs["accuracy"] <= 1.0


def test_training_the_context_on_a_toy_case_lowers_the_loss(clip) -> None:
    torch.manual_seed(0)
    teacher = PromptLearner(clip.model, clip.tokenizer, n_ctx=4, init_std=0.5)
    with torch.no_grad():
        centres = teacher(NAMES)
    targets = torch.arange(3).repeat(8)
    features = F.normalize(centres[targets] + 0.02 * torch.randn(len(targets), centres.shape[1]), dim=-1)
    method = ZSSegMethod(ZSSegConfig(n_ctx=4, lr=0.02), clip.model, clip.tokenizer, NAMES, [0, 1, 2])
    student = method.build_model()
    optimizer = method.build_optimizer(student)
    losses = []
    for _ in range(25):
        loss, _ = method.loss(student, features, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_warmup_cosine_lr_matches_detectron2_with_a_constant_warmup_factor(clip) -> None:
    method = ZSSegMethod(ZSSegConfig(warmup_steps=100, warmup_factor=0.005), clip.model, clip.tokenizer, NAMES, [0])
    factor = method.lr_factor(16000)
    assert factor(0) == pytest.approx(0.005)
    assert factor(99) == pytest.approx(0.005 * 0.5 * (1 + np.cos(np.pi * 99 / 16000)))
    assert factor(100) == pytest.approx(0.5 * (1 + np.cos(np.pi * 100 / 16000)))
    assert factor(8000) == pytest.approx(0.5)


def test_pairs_are_drawn_per_class_with_replacement_and_classes_without_images_get_none() -> None:
    images = {2: ["a", "b"], 5: [], 7: ["c"]}
    pairs = draw_pairs(images, per_class=32, seed=0)
    assert len(pairs) == 64 and pairs == draw_pairs(images, 32, 0)
    assert {k for k, c in pairs if c == 2} == {"a", "b"} and all(k == "c" for k, c in pairs if c == 7)
    assert [c for _, c in pairs] == [2] * 32 + [7] * 32


def test_feature_batches_resume_exactly_and_mirror_about_half() -> None:
    data = CropFeatures(torch.arange(10.0)[:, None], -torch.arange(10.0)[:, None], torch.zeros(10, dtype=torch.int64))
    targets = torch.arange(10)
    stream = feature_batches(data, targets, 4, "s", 0)
    first = [next(stream) for _ in range(6)]
    resumed = feature_batches(data, targets, 4, "s", 3)
    for expected in first[3:]:
        got = next(resumed)
        assert torch.equal(got["targets"], expected["targets"]) and torch.equal(got["features"], expected["features"])
    epoch = torch.cat([b["targets"] for b in first[:2]] + [first[2]["targets"][:2]])
    assert sorted(epoch.tolist()) == list(range(10))  # the first 10 samples are one permutation
    values = torch.cat([b["features"][:, 0] for b in first])
    assert torch.equal(values.abs(), torch.cat([b["targets"] for b in first]).float())
    assert 0 < (values < 0).sum() < len(values)  # some crops mirrored (the mirrored copies carry the sign)


def test_lambda_ensemble_on_a_hand_computed_case() -> None:
    p_clip = np.array([[0.6, 0.4]])
    p_mf = np.array([[0.2, 0.8]])
    seen = np.array([True, False])
    got = ensemble(p_clip, p_mf, seen, 0.8)
    # seen: 0.2^0.8 * 0.6^0.2 = 0.27595 * 0.90288; unseen: 0.8^0.2 * 0.4^0.8 = 0.95635 * 0.48045 (not renormalised)
    np.testing.assert_allclose(got, [[0.24915, 0.45948]], atol=1e-4)
    np.testing.assert_array_equal(ensemble(p_clip, None, seen, 0.8), p_clip)  # no model: CLIP alone
    np.testing.assert_array_equal(ensemble(p_clip, p_mf, seen, 0.0), p_clip)  # λ <= 0: CLIP alone
    flipped = ensemble(p_clip, p_mf, np.array([False, False]), 0.8)  # both unseen: CLIP dominates
    np.testing.assert_allclose(flipped, [[0.2 ** 0.2 * 0.6 ** 0.8, 0.8 ** 0.2 * 0.4 ** 0.8]], rtol=1e-9)


def test_mask_average_assembly_and_the_uncovered_remainder() -> None:
    scores = np.zeros((2, 2, 3))
    scores[0] = [[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    scores[1] = 1.0 - scores[0]
    masks = np.zeros((2, 2, 3), dtype=bool)
    masks[0, 0, :2] = True  # pixels (0,0) and (0,1)
    masks[1, 0, 2] = masks[1, 1, 0] = True
    np.testing.assert_allclose(mask_average(scores, masks), [[0.5, 0.5], [0.25, 0.75]])
    full = with_remainder(masks, (2, 3))
    assert full.shape == (3, 2, 3) and full[2].tolist() == [[False] * 3, [False, True, True]]
    semseg = assemble(np.array([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]]), full)
    np.testing.assert_allclose(semseg[:, 0], [[0.9, 0.9, 0.3], [0.1, 0.1, 0.7]], rtol=1e-6)
    np.testing.assert_allclose(semseg[:, 1], [[0.3, 0.5, 0.5], [0.7, 0.5, 0.5]], rtol=1e-6)
    assert with_remainder(full, (2, 3)).shape == (3, 2, 3)  # everything covered: no extra proposal


def test_crop_labeller_ensemble_moves_a_mask_to_the_models_seen_class(clip) -> None:
    from stages.pseudolabel.steps import label_masks_by_crops, mask_crop

    image = np.random.default_rng(4).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    masks = np.zeros((2, 48, 64), dtype=bool)
    masks[0, :20, :30], masks[1, 25:, 5:60] = True, True
    fill = [round(255 * m) for m in clip.mean]
    crops = torch.cat([clip.preprocess(mask_crop(image, m, fill), size=clip.image_size) for m in masks])
    text = clip.encode_image(crops)  # class k = mask k's own crop: CLIP alone labels mask k with class k
    ids, _ = label_masks_by_crops(image, masks, clip, text, np.array([4, 9]))
    assert ids.tolist() == [4, 9]
    p_mf = np.array([[0.0, 1.0], [0.0, 1.0]])  # the model is sure both masks are class 9 (a seen class here)
    ids, probs = label_masks_by_crops(image, masks, clip, text, np.array([4, 9]), p_mf=p_mf,
                                      seen=np.array([False, True]), weight=0.8)
    assert ids.tolist() == [9, 9] and (probs > 0).all()


TINY_DEMO = [  # pseudolabel (GT kept) -> train_zsseg -> eval (SAM proposals x learned prompts) and a crop labeller
    "executor=local", "toy.train_images=6", "toy.val_images=2", "toy.size=64", "pseudolabel.samples_per_shard=3",
    "pseudolabel.amg.points_per_side=4", "pseudolabel.report.enabled=false",
    "+stage@train_zsseg=train", "++train_zsseg.inputs.images=pseudolabel", "train_zsseg.method=zsseg",
    "train_zsseg.label_file=gt.png", "++train_zsseg.zsseg.samples_per_class=4", "++train_zsseg.zsseg.min_mask_area=20",
    "++train_zsseg.zsseg.amg.points_per_side=4", "train_zsseg.batch_size=8", "train_zsseg.loop.steps=4",
    "train_zsseg.loop.checkpoint_every=2",
    "~eval.inputs", "+eval.inputs.zsseg=train_zsseg", "eval.num_report_samples=0", "eval.samples_per_shard=2",
    "eval.methods=[{name:zsseg,kind:trained,input:zsseg,protocol:zsseg,protocol_overrides:{short_side:64}}]",
    "+stage@pseudolabel_zsseg=pseudolabel", "+pseudolabel_zsseg.inputs.prompts=train_zsseg",
    "+pseudolabel_zsseg.inputs.model=train_zsseg", "pseudolabel_zsseg.model_protocol=zsseg",
    "+pseudolabel_zsseg.model_protocol_overrides.short_side=64",
    "pseudolabel_zsseg.labeler=crop", "pseudolabel_zsseg.mode=stage12", "pseudolabel_zsseg.clip=${models.clip}",
    "pseudolabel_zsseg.sam=${models.sam}", "pseudolabel_zsseg.data=${pseudolabel.data}",
    "pseudolabel_zsseg.amg.points_per_side=8",
    "pseudolabel_zsseg.crop=32", "pseudolabel_zsseg.stride=16", "pseudolabel_zsseg.min_crops=0",
    "pseudolabel_zsseg.image_short_side=null", "pseudolabel_zsseg.min_mask_area=20",
    "pseudolabel_zsseg.report.enabled=false", "pseudolabel_zsseg.samples_per_shard=3",
    "pseudolabel_zsseg.image_format=png",  # lossless, so the test re-labels the very pixels the stage saw
    "stages=[pseudolabel,train_zsseg,eval,pseudolabel_zsseg]",
]


@pytest.mark.slow
def test_zsseg_trains_from_ground_truth_shards_and_serves_eval_and_the_crop_labeller(tmp_path) -> None:
    import json
    from pathlib import Path

    from pipeline.predict.engine import predict_scores
    from pipeline.predict.load_trained import load_trained
    from pipeline.predict.protocol import load_protocol
    from pipeline.run import compose, run
    from pipeline.sample_files import decode_label_png, rle_to_mask
    from pipeline.shards import open_stage
    from pipeline.train.batches import decode_rgb
    from pipeline.train.checkpoints import read_model
    from stages.pseudolabel.steps import label_masks_by_crops

    summaries = run(compose("demo", [f"output_root={tmp_path}", *TINY_DEMO]))
    assert {s.node: s.status for s in summaries} == dict.fromkeys(
        ["pseudolabel", "train_zsseg", "eval", "pseudolabel_zsseg"], "ran")
    trained = open_stage(str(tmp_path / "train_zsseg"))
    artifact = read_model(trained)
    assert artifact["method"] == "zsseg" and set(artifact["trainable"]) == {"ctx"}
    assert artifact["trainable"]["ctx"].shape == (16, 128)
    assert trained.manifest["final_log"]["step"] == 4

    metrics = json.loads(Path(open_stage(str(tmp_path / "eval")).path, "metrics.json").read_text())["methods"]
    assert metrics["zsseg"]["protocol"]["name"] == "zsseg" and 0.0 <= metrics["zsseg"]["mIoU"] <= 100.0

    labelled = open_stage(str(tmp_path / "pseudolabel_zsseg"))
    vocab = load_vocab("toy")
    predictor = load_trained(trained, vocab)
    protocol = load_protocol("zsseg", [{"short_side": 64}])
    template_text = predictor.clip.encode_text(load_vocab("toy").prompt_names(), ("a photo of a {}.",))
    differs = 0
    for sample in labelled.samples():
        info = json.loads(sample["json"])
        assert info["models"]["prompts"] == info["models"]["model"] == trained.fingerprint
        records = json.loads(sample["masks.json"])
        if not records:
            continue
        masks = np.stack([rle_to_mask(r["segmentation"]) for r in records])
        present = np.asarray(info["present_classes"])
        image = decode_rgb(sample["png"])
        scores = predict_scores(image, predictor.logits, protocol, 12, vocab.seen_ids).numpy()
        p_mf = mask_average(scores, masks)[:, present]  # the model port's mask-averaged probabilities
        learned, _ = label_masks_by_crops(image, masks, predictor.clip, predictor.text[present], present, p_mf=p_mf,
                                          seen=np.isin(present, vocab.seen_ids), weight=0.8)
        template, _ = label_masks_by_crops(image, masks, predictor.clip, template_text[present], present)
        assert learned.tolist() == [r["category_id"] for r in records]
        differs += int((learned != template).sum())
        assert decode_label_png(sample["label.png"]).shape == image.shape[:2]
    assert differs > 0, "template crop labels are the same: this check needs masks where they differ"


@pytest.mark.parametrize(("extra", "message"), [
    (["+pseudolabel.inputs.prompts=train_ifseg"], "set pseudolabel.labeler=crop"),
    (["+pseudolabel.inputs.teacher=train_ifseg", "pseudolabel.labeler=crop"], "unknown port(s) ['teacher']"),
])
def test_crop_labeller_ports_are_checked_before_any_work(tmp_path, extra, message) -> None:
    from pipeline.config import ConfigError
    from pipeline.run import compose, run

    with pytest.raises(ConfigError, match=re.escape(message)):
        run(compose("demo", [f"output_root={tmp_path}", "executor=local", "stages=[pseudolabel]", *extra]))
    assert not (tmp_path / "pseudolabel").exists()
