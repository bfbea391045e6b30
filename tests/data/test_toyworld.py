"""ToyWorld generator and adapter: determinism, label/instance consistency, learnable statistics, contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.records import ItemRef
from pipeline.data.toyworld import (
    BOAT,
    CAR,
    CLASS_NAMES,
    MIN_THING_FRACTION,
    ROAD,
    SKY,
    STUFF_IDS,
    THING_IDS,
    WATER,
    ToyWorldAdapter,
    parse_source,
    render_scene,
    split_seed,
)
from pipeline.data.vocab import load_vocab


@pytest.fixture(scope="module")
def scenes() -> list:
    return [render_scene(split_seed("train", index), 96) for index in range(40)]


def test_same_seed_gives_identical_bytes_and_different_seeds_differ() -> None:
    first, again, other = render_scene(123), render_scene(123), render_scene(124)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.label.tobytes() == again.label.tobytes()
    assert [(c, m.tobytes()) for c, m in first.instances] == [(c, m.tobytes()) for c, m in again.instances]
    assert first.image.tobytes() != other.image.tobytes()


def test_layout_is_the_same_at_another_resolution() -> None:
    for seed in range(5):
        small, large = render_scene(seed, 64).label, render_scene(seed, 128).label
        assert (large[::2, ::2] == small).mean() > 0.9


def test_split_seed_ranges_are_disjoint() -> None:
    top = {s: split_seed(s, 2**24 - 1, 2**16 - 1) for s in ("train", "val", "test")}
    assert top["train"] < split_seed("val", 0) and top["val"] < split_seed("test", 0)
    assert split_seed("train", 5, world_seed=1) != split_seed("train", 5, world_seed=0)
    with pytest.raises(ValueError, match="split"):
        split_seed("dev", 0)
    with pytest.raises(ValueError):
        split_seed("train", 2**24)
    train = ToyWorldAdapter("train", num_images=4, size=32)
    val = ToyWorldAdapter("val", num_images=4, size=32)
    train_images = {train.load(r).image.tobytes() for r in train.list_items()}
    assert not train_images & {val.load(r).image.tobytes() for r in val.list_items()}


def test_every_pixel_has_a_valid_label(scenes: list) -> None:
    for scene in scenes:
        assert scene.image.dtype == np.uint8 and scene.image.shape == (96, 96, 3)
        assert scene.label.dtype == np.uint8 and scene.label.shape == (96, 96)
        assert scene.label.max() < len(CLASS_NAMES)
    present = set().union(*(np.unique(s.label).tolist() for s in scenes))
    assert present == set(range(len(CLASS_NAMES)))


def test_instance_masks_agree_with_the_label_map(scenes: list) -> None:
    assert sum(len(s.instances) for s in scenes) > 40
    for scene in scenes:
        owners = np.zeros(scene.label.shape, int)
        for class_id, mask in scene.instances:
            assert class_id in THING_IDS and mask.dtype == bool
            assert mask.sum() >= MIN_THING_FRACTION * mask.size
            assert (scene.label[mask] == class_id).all()
            owners += mask
        assert owners.max() <= 1
        assert ((owners == 1) == np.isin(scene.label, THING_IDS)).all()


def test_segments_partition_the_image(scenes: list) -> None:
    for scene in scenes[:10]:
        segments = scene.segments()
        coverage = np.sum([mask for _, mask in segments], axis=0)
        assert (coverage == 1).all()
        assert all((scene.label[mask] == class_id).all() for class_id, mask in segments)


def test_context_rules_hold(scenes: list) -> None:
    for scene in scenes:
        classes = set(np.unique(scene.label).tolist())
        assert CAR not in {c for c, _ in scene.instances} or ROAD in classes
        assert BOAT not in {c for c, _ in scene.instances} or WATER in classes
        assert (scene.label[0] == SKY).mean() > 0.3
        assert (scene.label[-1] == SKY).sum() == 0


def _segment_colour_features(scenes: list) -> tuple[np.ndarray, np.ndarray]:
    features, labels = [], []
    for scene in scenes:
        for class_id, mask in scene.segments():
            if class_id in STUFF_IDS and mask.sum() >= 10:
                pixels = scene.image[mask].astype(float)
                features.append(np.r_[pixels.mean(0), pixels.std(0)])
                labels.append(class_id)
    return np.array(features), np.array(labels)


def test_stuff_classes_are_separable_by_colour_statistics(scenes: list) -> None:
    fit_x, fit_y = _segment_colour_features(scenes[:25])
    test_x, test_y = _segment_colour_features(scenes[25:])
    means = np.stack([fit_x[fit_y == c].mean(0) for c in STUFF_IDS])
    predicted = np.array(STUFF_IDS)[np.argmin(((test_x[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    assert (predicted == test_y).mean() > 0.85


def test_adapter_contract() -> None:
    adapter = ToyWorldAdapter(split="val", num_images=3, size=48, seed=2)
    refs = adapter.list_items()
    assert [r.key for r in refs] == ["toy_val_000000", "toy_val_000001", "toy_val_000002"]
    assert refs[1].source == "toyworld://val/1?size=48&seed=2"
    assert adapter.vocab.name == "toy" and adapter.name == "toyworld"
    record = adapter.load(refs[1])
    scene = render_scene(split_seed("val", 1, world_seed=2), 48)
    assert record.error is None and record.key == "toy_val_000001"
    assert record.image.tobytes() == scene.image.tobytes() and record.label.tobytes() == scene.label.tobytes()
    assert json.loads(json.dumps(record.meta))["classes"] == np.unique(scene.label).tolist()
    assert [(c, m.tobytes()) for c, m in adapter.instances(refs[1])] == [(c, m.tobytes()) for c, m in scene.instances]


def test_adapter_rejects_bad_input() -> None:
    bad = ToyWorldAdapter().load(ItemRef(key="k", source="toyworld://dev/1?size=32"))
    assert bad.image is None and not bad.ok and "split" in bad.error
    assert ToyWorldAdapter().load(ItemRef(key="k", source="file:///x.png")).error
    assert parse_source("toyworld://test/7") == ("test", 7, 128, 0)
    with pytest.raises(ValueError):
        ToyWorldAdapter(split="holdout")


def test_class_order_matches_the_toy_vocabulary() -> None:
    vocab = load_vocab("toy")
    assert vocab.names == CLASS_NAMES
    assert [vocab.names[i] for i in vocab.unseen_ids] == ["tree", "dog", "boat"]
    assert ToyWorldAdapter(vocab=vocab).vocab is vocab
    with pytest.raises(ValueError, match="vocab=toy"):
        ToyWorldAdapter(vocab="voc_21")


MODELS = Path(__file__).resolve().parents[2] / "assets" / "models"
CLIP_MARGIN = 0.15  # recall@#present, fraction
SAM_MARGIN = 0.2  # mean best-of-3 IoU, fraction


def _interior_point(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    y, x = np.unravel_index(np.argmax(ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]), mask.shape)
    return np.array([[x + 0.5, y + 0.5]])


def _clip_recall(clip: object, scenes: list) -> float:
    """Mean fraction of an image's classes (>= 0.5 % of pixels) found in its top-k zero-shot classes, k = #present."""
    import torch

    text = clip.encode_text(CLASS_NAMES, ("a photo of a {}.",))
    pixels = torch.cat([clip.preprocess(s.image, size=clip.image_size) for s in scenes])
    ranked = torch.argsort(clip.encode_image(pixels) @ text.T, dim=1, descending=True).numpy()
    recalls = []
    for scene, order in zip(scenes, ranked):
        present = np.flatnonzero(np.bincount(scene.label.ravel(), minlength=12) >= 0.005 * scene.label.size)
        recalls.append(np.isin(order[: len(present)], present).mean())
    return float(np.mean(recalls))


@pytest.mark.skipif(not (MODELS / "toy_clip.pt").is_file(), reason="trained toy CLIP not committed")
def test_trained_toy_clip_beats_random_init_at_zero_shot_classification() -> None:
    from pipeline.models.clip import Clip, ClipConfig

    scenes = [render_scene(split_seed("val", i)) for i in range(24)]
    trained = _clip_recall(Clip.build(ClipConfig(model_name="toy-vit", pretrained=str(MODELS / "toy_clip.pt"))), scenes)
    random_init = _clip_recall(Clip.build(ClipConfig(model_name="toy-vit", pretrained=None)), scenes)
    assert trained > random_init + CLIP_MARGIN


@pytest.mark.skipif(not (MODELS / "toy_sam.pt").is_file(), reason="trained toy SAM not committed")
def test_trained_toy_sam_beats_random_init_at_point_prompted_masks() -> None:
    from pipeline.models.sam import Sam, SamConfig

    def best_iou(sam: Sam) -> float:
        ious = []
        for index in range(4):
            scene = render_scene(split_seed("val", index))
            segments = [m for _, m in scene.segments() if m.sum() >= 24]
            results = sam.predict_points(scene.image, [_interior_point(m) for m in segments])
            for mask, (masks, _) in zip(segments, results):
                ious.append(max((mask & m).sum() / (mask | m).sum() for m in masks))
        return float(np.mean(ious))

    trained = best_iou(Sam.build(SamConfig(model_type="toy", checkpoint=str(MODELS / "toy_sam.pt"))))
    assert trained > best_iou(Sam.build(SamConfig(model_type="toy", checkpoint=None))) + SAM_MARGIN
