"""Selftrain stage: the three pseudo-label policies, the threshold, the evaluation-split guard, sample files, e2e."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from selftrain_fixtures import FixedLogitsPredictor

from pipeline import dag
from pipeline.config import ConfigError
from pipeline.data.records import ImageRecord
from pipeline.data.toyworld import ToyWorldAdapter
from pipeline.executor import run_batch
from pipeline.stage import StageContext
from stages.selftrain import SelfTrainStage
from stages.selftrain import stage as selftrain_stage
from stages.selftrain.policies import (
    is_eval_split,
    policy_all_pixels,
    policy_maskclip_plus,
    policy_zsseg_st,
    pseudo_label,
    restricted_argmax,
)

I = 255  # noqa: E741 - ignore, short so the expected maps read as grids
SEEN, UNSEEN = (0, 1), (2, 3)
GT = np.array([[0, 2, I], [3, 1, I]], dtype=np.uint8)
# scores[c, y, x]: per pixel, the overall winner is sometimes seen; among unseen the winner varies.
SCORES = np.array([
    [[0.70, 0.10, 0.10], [0.05, 0.30, 0.60]],   # class 0 (seen)
    [[0.10, 0.50, 0.10], [0.05, 0.40, 0.10]],   # class 1 (seen)
    [[0.15, 0.15, 0.20], [0.50, 0.20, 0.05]],   # class 2 (unseen)
    [[0.05, 0.25, 0.60], [0.40, 0.10, 0.25]],   # class 3 (unseen)
], dtype=np.float32)


def test_restricted_argmax_picks_among_candidates_and_breaks_ties_to_the_lowest_id():
    winner, score = restricted_argmax(SCORES, [3, 2])
    assert winner.tolist() == [[2, 3, 3], [2, 2, 3]]
    np.testing.assert_allclose(score, [[0.15, 0.25, 0.60], [0.50, 0.20, 0.25]])
    tie = np.full((3, 1, 1), 0.5, dtype=np.float32)
    assert restricted_argmax(tie, [2, 1])[0].tolist() == [[1]]


def test_maskclip_plus_labels_only_unseen_gt_pixels():
    label = policy_maskclip_plus(SCORES, GT, SEEN, UNSEEN)
    assert label.dtype == np.uint8
    assert label.tolist() == [[0, 3, I], [2, 1, I]]  # GT 255 stays ignore even where unseen class 3 wins


def test_zsseg_st_labels_every_pixel_not_covered_by_seen_gt():
    assert policy_zsseg_st(SCORES, GT, SEEN, UNSEEN).tolist() == [[0, 3, 3], [2, 1, 3]]


def test_all_pixels_is_the_plain_argmax_and_never_needs_gt():
    label = policy_all_pixels(SCORES)
    assert label.tolist() == [[0, 1, 3], [2, 1, 0]]
    assert policy_all_pixels(SCORES, dtype=np.uint16, ignore_index=65535, threshold=0.55).tolist() == [
        [0, 65535, 3], [65535, 65535, 0]]


def test_threshold_rejects_low_winning_scores_without_renormalising():
    # unseen winners of the pseudo-labelled pixels: (0,1) 0.25, (0,2) 0.60, (1,0) 0.50, (1,2) 0.25.
    # Renormalised over {2, 3}, (0,1) would be 0.25 / 0.40 = 0.625 and pass 0.3; as given it is rejected.
    assert policy_zsseg_st(SCORES, GT, SEEN, UNSEEN, threshold=0.3).tolist() == [[0, I, 3], [2, 1, I]]
    assert policy_maskclip_plus(SCORES, GT, SEEN, UNSEEN, threshold=0.5).tolist() == [[0, I, I], [2, 1, I]]
    assert policy_zsseg_st(SCORES, GT, SEEN, UNSEEN, threshold=0.0).tolist() == [[0, 3, 3], [2, 1, 3]]


def test_zsseg_st_equals_zsseg_pseudo_evaluator_formula_on_random_scores():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 20, 30)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    gt = rng.choice([0, 1, 2, 3, 4, 5, 255], size=(20, 30)).astype(np.uint8)
    seen, unseen = (0, 2, 4), (1, 3, 5)
    # GeneralizedPseudoSemSegEvaluator: prob * (1 - trainable_flag), argmax, reject, then seen GT written over.
    flag = np.isin(np.arange(6), seen).astype(np.float32)[:, None, None]
    pseudo = probs * (1 - flag)
    expected = pseudo.argmax(0).astype(np.uint8)
    expected[pseudo.max(0) < 0.3] = 255
    expected[np.isin(gt, seen)] = gt[np.isin(gt, seen)]
    np.testing.assert_array_equal(policy_zsseg_st(probs, gt, seen, unseen, threshold=0.3), expected)


@pytest.mark.parametrize("policy, targets, expected", [
    ("maskclip_plus", [[0, 1, 0], [1, 0, 0]], policy_maskclip_plus(SCORES, GT, SEEN, UNSEEN)),
    ("zsseg_st", [[0, 1, 1], [1, 0, 1]], policy_zsseg_st(SCORES, GT, SEEN, UNSEEN)),
    ("all_pixels", [[1, 1, 1], [1, 1, 1]], policy_all_pixels(SCORES)),
])
def test_pseudo_label_dispatches_to_the_policy_and_names_its_target_pixels(policy, targets, expected):
    label, target = pseudo_label(policy, SCORES, GT.astype(np.int64), SEEN, UNSEEN, I, 0.0, np.uint8)
    assert label.dtype == np.uint8 and target.astype(int).tolist() == targets
    np.testing.assert_array_equal(label, expected)


@pytest.mark.parametrize("split, expected", [
    ("val", True), ("Validation", True), ("test", True), ("val2017", True), ("test-2017", True),
    ("train", False), ("train2017", False), ("trainaug", False), (None, False),
])
def test_is_eval_split(split, expected):
    assert is_eval_split(split) is expected


def test_is_eval_split_custom_list():
    assert is_eval_split("holdout", ["holdout"]) and not is_eval_split("val", [])


def make_stage(**config) -> SelfTrainStage:
    config = {"vocab": "toy", "data": {"kind": "toyworld", "split": "train", "num_images": 2, "size": 32},
              "protocol_overrides": {"short_side": 32}, **config}
    upstream = {"model": SimpleNamespace(fingerprint="fp-model", manifest={"node": "train_ifseg"})}
    return SelfTrainStage(StageContext(node="selftrain", seed=0, config=config, upstream=upstream))


@pytest.mark.parametrize("policy", ["maskclip_plus", "zsseg_st"])
def test_gt_policies_refuse_an_evaluation_split_before_any_work(policy):
    with pytest.raises(ConfigError, match=r"selftrain.data.split='val' is an evaluation split.*issue #18"):
        make_stage(policy=policy, data={"kind": "toyworld", "split": "val"})
    with pytest.raises(ConfigError, match="evaluation split"):  # the kind's default split (coco_stuff: val)
        make_stage(vocab="coco_stuff_171", policy=policy, data={"kind": "coco_stuff", "root": "/nonexistent"})
    with pytest.raises(ConfigError, match="evaluation split"):
        make_stage(policy=policy, data={"kind": "toyworld", "split": "train"}, eval_splits=["train"])


def test_all_pixels_may_run_on_an_evaluation_split_but_writes_no_gt(monkeypatch):
    stage = make_stage(policy="all_pixels", data={"kind": "toyworld", "split": "val", "num_images": 1, "size": 32})
    outputs = run_stage(monkeypatch, stage, [0.0] * 12)
    assert outputs[0].ok and "gt.png" not in outputs[0].files
    assert "quality" in stage.end_shard()  # label quality is still measured (a report, not training data)


@pytest.mark.parametrize("config, message", [
    ({"policy": "st"}, r"selftrain.policy='st': expected one of"),
    ({"vocab": "camvid_11", "policy": "zsseg_st"}, "no `unseen:` list"),
    ({"protocol_overrides": {"knn_postprocess": True}}, "set selftrain.knn instead"),
    ({"protocol": "nope"}, "presets"),
    ({"threshold": 1.5}, r"in \[0, 1\]"),
    ({"image_format": "webp"}, r"selftrain.image_format='webp'"),
    ({"bogus": 1}, "unknown config key"),
])
def test_bad_knobs_fail_with_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        make_stage(**config)


def run_stage(monkeypatch, stage: SelfTrainStage, logits: list[float]) -> list:
    predictor = FixedLogitsPredictor(logits)
    monkeypatch.setattr(selftrain_stage, "load_trained", lambda output, vocab, device, knn: predictor)
    stage.setup()
    records = [stage.load(ref) for ref in stage.plan()[0].items]
    return run_batch(stage, records)


TOY_LOGITS = [0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 1.0, 0.0]  # water wins overall, dog among unseen


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_process_batch_writes_schema_files_with_policy_labels_and_quality(monkeypatch):
    stage = make_stage(policy="maskclip_plus")
    outputs = run_stage(monkeypatch, stage, TOY_LOGITS)
    adapter = ToyWorldAdapter(split="train", num_images=2, size=32, vocab="toy")
    quality = np.zeros((12, 12), dtype=np.int64)
    for out, ref in zip(outputs, adapter.list_items()):
        gt = adapter.load(ref).label
        expected = gt.copy()
        expected[np.isin(gt, [5, 9, 10])] = 9  # unseen GT (tree, dog, boat) -> best unseen logit (dog)
        assert sorted(out.files) == ["gt.png", "jpg", "json", "label.png", "masks.json"]
        np.testing.assert_array_equal(decode_png(out.files["label.png"]), expected)
        np.testing.assert_array_equal(decode_png(out.files["gt.png"]), gt)
        meta = json.loads(out.files["json"])
        assert meta["schema"] == "pseudolabel/1" and meta["models"]["model"] == "fp-model"
        assert meta["config"]["policy"] == "maskclip_plus" and meta["config"]["protocol"]["knn_postprocess"] is False
        unseen_pixels = int(np.isin(gt, [5, 9, 10]).sum())
        assert meta["pixels"] == {"from_model": unseen_pixels, "rejected": 0, "from_gt": gt.size - unseen_pixels,
                                  "ignore": 0}
        for cls in (5, 9, 10):
            quality[cls, 9] += int((gt == cls).sum())
    assert np.array_equal(np.asarray(stage.end_shard()["quality"]["matrix"]), quality)
    assert stage.end_shard() == {"pixels": {"from_model": 0, "rejected": 0, "from_gt": 0, "ignore": 0}}  # reset


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
def test_masks_json_regions_tile_the_label_map(monkeypatch):
    from pipeline.sample_files import rle_to_mask

    stage = make_stage(policy="all_pixels", threshold=0.0)
    out = run_stage(monkeypatch, stage, TOY_LOGITS)[0]
    label = decode_png(out.files["label.png"])
    assert np.all(label == 3)
    (region,) = json.loads(out.files["masks.json"])
    assert region["category_id"] == 3 and region["producer"] == "selftrain"
    assert region["area"] == 32 * 32 and region["bbox"] == [0, 0, 32, 32]
    assert np.array_equal(rle_to_mask(region["segmentation"]), label == 3)
    probs = np.exp(TOY_LOGITS) / np.exp(TOY_LOGITS).sum()
    assert region["score"] == pytest.approx(probs[3], abs=1e-5)


def test_missing_gt_fails_the_sample_not_the_shard(monkeypatch):
    stage = make_stage(policy="zsseg_st")
    run_stage(monkeypatch, stage, TOY_LOGITS)
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    no_gt = ImageRecord(key="nogt", image=image, label=None, meta={"source": "x"})
    bad = ImageRecord(key="bad", image=None, label=None, meta={}, error="zero-byte file")
    outputs = stage.process_batch([no_gt, bad])
    assert [(o.key, o.ok, o.error) for o in outputs] == [
        ("nogt", False, "policy zsseg_st needs ground truth; this image has none"), ("bad", False, "zero-byte file")]


def test_model_with_other_classes_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match="predicts 3 classes"):
        run_stage(monkeypatch, make_stage(), [0.0, 1.0, 2.0])


def test_end_to_end_through_the_runner(tmp_path, monkeypatch):
    from pipeline.run import compose, run
    from pipeline.shards import open_stage

    monkeypatch.setitem(dag.STAGES, "fakemodel", "selftrain_fixtures:FakeModelStage")
    predictor = FixedLogitsPredictor(TOY_LOGITS)
    monkeypatch.setattr(selftrain_stage, "load_trained", lambda output, vocab, device, knn: predictor)
    overrides = [f"output_root={tmp_path}", "executor=local", "+model={stage:fakemodel,inputs:{}}",
                 "+stage@st=selftrain", "st.inputs.model=model", "st.policy=zsseg_st",
                 "+st.data={kind:toyworld,split:train,num_images:3,size:32}", "st.samples_per_shard=2",
                 "+st.protocol_overrides.short_side=32", "stages=[model,st]"]
    summaries = run(compose("demo", overrides))
    assert [(s.node, s.status, s.samples, s.failed, s.shards) for s in summaries][1] == ("st", "ran", 3, 0, 2)
    output = open_stage(str(tmp_path / "st"))
    model_fp = open_stage(str(tmp_path / "model")).fingerprint
    samples = list(output.samples())
    assert [s["__key__"] for s in samples] == ["toy_train_000000", "toy_train_000001", "toy_train_000002"]
    unseen_pixels = 0
    for sample in samples:
        gt, label = decode_png(sample["gt.png"]), decode_png(sample["label.png"])
        expected = np.where(np.isin(gt, [5, 9, 10]), 9, gt)  # toyworld labels every pixel: no 255 to fill
        np.testing.assert_array_equal(label, expected)
        assert json.loads(sample["json"])["models"]["model"] == model_fp
        unseen_pixels += int(np.isin(gt, [5, 9, 10]).sum())
    report = json.loads((tmp_path / "st" / output.fingerprint / "selftrain_quality.json").read_text())
    assert report["policy"] == "zsseg_st" and report["metrics"]["num_pixels"] == unseen_pixels > 0
    assert report["pixels"]["from_model"] == unseen_pixels
    assert output.manifest["selftrain"]["quality_file"] == "selftrain_quality.json"
    review = json.loads((tmp_path / "st" / output.fingerprint / "report" / "report.json").read_text())
    assert output.manifest["report"]["path"] == "report/report.md"
    assert review["quality"]["selftrain"]["mIoU"] == pytest.approx(report["metrics"]["mIoU"])
    assert run(compose("demo", overrides))[1].status == "up to date"


def test_label_png_keeps_uint16_ids_exactly():
    from pipeline.data.images import read_label_png
    from pipeline.sample_files import encode_label_png

    label = np.array([[0, 300], [65535, 171]], dtype=np.uint16)
    np.testing.assert_array_equal(read_label_png(encode_label_png(label)), label)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_label_png(label.astype(np.int64))


def test_image_format_none_keeps_only_a_reference(monkeypatch):
    out = run_stage(monkeypatch, make_stage(image_format="none", class_masks=False), TOY_LOGITS)[0]
    assert sorted(out.files) == ["gt.png", "json", "label.png", "masks.json"]
    assert json.loads(out.files["masks.json"]) == []
    assert json.loads(out.files["json"])["source"] == "toyworld://train/0?size=32&seed=0"


def test_threshold_rejections_are_counted_and_leave_ignore(monkeypatch):
    stage = make_stage(policy="all_pixels", threshold=0.8)  # water's softmax score is e^4 / sum = 0.741
    out = run_stage(monkeypatch, stage, TOY_LOGITS)[0]
    assert np.all(decode_png(out.files["label.png"]) == 255) and json.loads(out.files["masks.json"]) == []
    assert json.loads(out.files["json"])["pixels"] == {"from_model": 0, "rejected": 1024, "from_gt": 0,
                                                       "ignore": 1024}
    assert stage.end_shard()["pixels"]["rejected"] == 2 * 1024


def test_class_regions_scores_areas_and_boxes_on_a_hand_made_map():
    from stages.selftrain.regions import class_regions

    label = np.array([[1, 1, I], [I, 2, 1]], dtype=np.uint8)
    regions = class_regions(label, SCORES, I)
    assert [(r["category_id"], r["area"], r["bbox"]) for r in regions] == [(1, 3, [0, 0, 3, 2]), (2, 1, [1, 1, 1, 1])]
    assert regions[0]["score"] == pytest.approx((0.10 + 0.50 + 0.10) / 3, abs=1e-6)
    assert regions[1]["score"] == pytest.approx(0.20, abs=1e-6)


def test_knn_needs_an_ifseg_model_and_is_refused_before_any_work_otherwise():
    def stage(method: str) -> SelfTrainStage:
        built = make_stage(knn=True)
        built.context.upstream["model"].manifest["config"] = {"method": method}
        return built

    with pytest.raises(ConfigError, match=r"selftrain.knn=true: .* port model is a 'zegclip' model"):
        stage("zegclip").plan()
    assert len(stage("ifseg").plan()) == 1  # 2 toy images, one shard
