"""The training-free suite presets (conf/suite/*.yaml via conf/training_free.yaml): each benchmark's vocabulary,
dataset adapter and test-time protocol as SCLIP's configs set them (wangf3014/SCLIP configs/cfg_*.py: Resize
scale=(2048, short side), slide crop 224 / stride 112 from clip_segmentor.py; cls_voc21.txt's background words)."""

from __future__ import annotations

import pytest

from pipeline import dag
from pipeline.planning import driver_stage
from pipeline.run import compose

# node: (vocabulary, adapter kind, short side, number of classes)
SCLIP = {
    "eval_voc21": ("voc_21", "voc", 336, 21),
    "eval_context60": ("pascal_context_60", "semseg", 336, 60),
    "eval_coco_object": ("coco_object_81", "semseg", 336, 81),
    "eval_voc20": ("voc_20", "voc", 336, 20),
    "eval_context59": ("pascal_context_59", "semseg", 336, 59),
    "eval_coco_stuff": ("coco_stuff_171", "coco_stuff", 448, 171),
    "eval_cityscapes": ("cityscapes_19", "cityscapes", 560, 19),
    "eval_ade": ("ade20k_150", "ade20k", 336, 150),
}
# SCLIP configs/cls_voc21.txt, first line: the names of its background class
SCLIP_BACKGROUND = ("sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
                    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
                    "floor", "hill", "rail", "fence")


@pytest.fixture(scope="module")
def suite() -> tuple[dict, dict]:
    config = compose("training_free")
    nodes = dag.build_nodes(config)
    return config, {name: driver_stage(nodes[name], config) for name in nodes}


def test_the_suite_has_the_eight_benchmarks(suite):
    _, stages = suite
    assert set(stages) == set(SCLIP)


@pytest.mark.parametrize("node", sorted(SCLIP))
def test_each_benchmark_uses_its_vocabulary_adapter_and_sclip_protocol(suite, node):
    config, stages = suite
    vocab, kind, short_side, classes = SCLIP[node]
    stage = stages[node]
    assert stage.vocab.name == vocab and stage.eval_vocab.num_classes == classes
    assert config[node]["data"]["kind"] == kind and stage.adapter.vocab.name == vocab
    (method,) = stage.methods
    protocol = method.protocol
    assert (protocol.short_side, protocol.max_long_side, protocol.mode, protocol.crop, protocol.stride) == (
        short_side, 2048, "slide", 224, 112)
    assert (protocol.score, protocol.seen_penalty, protocol.knn_postprocess) == ("softmax", 0.0, False)
    assert stage.unseen_ids is None  # plain mIoU, no seen/unseen split


def test_background_benchmarks_fold_sclip_background_words_into_class_0(suite):
    _, stages = suite
    voc21, coco_object = stages["eval_voc21"], stages["eval_coco_object"]
    assert voc21.predict_vocab.names == (*voc21.vocab.names, *SCLIP_BACKGROUND) and voc21.background_id == 0
    # "bed" is a COCO-Object class: it stays a class and is not a background word
    no_bed = tuple(word for word in SCLIP_BACKGROUND if word != "bed")
    assert coco_object.predict_vocab.names == (*coco_object.vocab.names, *no_bed) and coco_object.background_id == 0
    for node in ("eval_context60", "eval_voc20", "eval_context59", "eval_coco_stuff", "eval_cityscapes", "eval_ade"):
        assert stages[node].background_id is None and stages[node].predict_vocab == stages[node].vocab
