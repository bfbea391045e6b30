"""Exports read back by the project's own adapters and by the tools they are for: COCO (pycocotools, COCOeval),
MMSeg folders (the `semseg` adapter), Hugging Face Parquet (`datasets`); uint8 and uint16 vocabularies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from label_fixtures import big_vocab, label_sample, publish

from pipeline.data.coco import COCOAdapter
from pipeline.data.registry import build_adapter
from pipeline.data.vocab import load_vocab
from pipeline.export.__main__ import main
from pipeline.sample_files import decode_image_rgb, decode_label_png, rle_to_mask
from pipeline.shards import SampleOutput, StageOutput, open_stage

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools 2.0.x vs numpy 2


def export(source: str, fmt: str, out: Path, *extra: str) -> int:
    return main([source, "--format", fmt, "--out", str(out), "--executor", "local", *extra])


def source_samples(output: StageOutput) -> dict[str, dict]:
    return {s["__key__"]: s for s in output.samples()}


@pytest.fixture(scope="module")
def coco_export(demo_pseudolabels: StageOutput, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco")
    assert export(demo_pseudolabels.path, "coco", out) == 0
    return out


def test_coco_semantic_and_ground_truth_read_back_through_the_coco_adapter(demo_pseudolabels, coco_export):
    vocab, source = load_vocab("toy"), source_samples(demo_pseudolabels)
    for kind, member in (("semantic", "label.png"), ("ground_truth", "gt.png")):
        adapter = COCOAdapter(str(coco_export / "annotations" / f"{kind}_train.json"), vocab=vocab,
                              image_root=str(coco_export / "images" / "train"), split="train", unannotated="ignore")
        refs = adapter.list_items()
        assert sorted(r.key.removeprefix("coco_train_") for r in refs) == sorted(source)
        for ref in refs:
            record, sample = adapter.load(ref), source[ref.key.removeprefix("coco_train_")]
            assert record.ok, record.error
            np.testing.assert_array_equal(record.label, decode_label_png(sample[member]))
            np.testing.assert_array_equal(record.image, decode_image_rgb(sample["jpg"]))


def test_coco_instances_keep_every_mask_with_score_and_producer(demo_pseudolabels, coco_export):
    from pycocotools.coco import COCO

    vocab = load_vocab("toy")
    coco = COCO(str(coco_export / "annotations" / "instances_train.json"))
    assert [(c["id"], c["name"], c["supercategory"]) for c in coco.loadCats(coco.getCatIds())] == \
        [(i + 1, n, g) for i, (n, g) in enumerate(zip(vocab.names, vocab.coarse))]
    total = 0
    for image in coco.loadImgs(coco.getImgIds()):
        masks = json.loads(source_samples(demo_pseudolabels)[image["segetl_key"]]["masks.json"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(anns) == len(masks)
        for ann, entry in zip(anns, masks):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), rle_to_mask(entry["segmentation"]))
            assert (ann["category_id"], ann["score"], ann["producer"], ann["area"], ann["bbox"]) == \
                (entry["category_id"] + 1, entry["score"], entry["producer"], entry["area"], entry["bbox"])
        total += len(anns)
    assert total == sum(demo_pseudolabels.manifest["num_masks"].values()) > 0


def test_cocoeval_scores_the_pseudolabels_against_the_demo_ground_truth(coco_export):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(coco_export / "annotations" / "ground_truth_train.json"))

    def evaluate(annotation_file: Path) -> np.ndarray:
        detections = gt.loadRes(json.loads(annotation_file.read_text())["annotations"])
        evaluation = COCOeval(gt, detections, "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        return evaluation.stats

    perfect = evaluate(coco_export / "annotations" / "ground_truth_train.json")
    assert perfect[0] == pytest.approx(1.0)  # the wiring (ids, categories, RLE) is right
    pseudo = evaluate(coco_export / "annotations" / "instances_train.json")
    assert 0.0 < pseudo[0] < 1.0 and 0.0 < pseudo[1] < 1.0


def test_mmseg_folders_read_back_through_the_semseg_adapter(demo_pseudolabels, tmp_path):
    out = tmp_path / "mmseg"
    assert export(demo_pseudolabels.path, "mmseg", out) == 0
    source = source_samples(demo_pseudolabels)
    adapter = build_adapter({"kind": "semseg", "root": str(out), "split": "train", "vocab": "toy"})
    refs = adapter.list_items()
    assert sorted(r.key.removeprefix("semseg_train_") for r in refs) == sorted(source)
    for ref in refs:
        key = ref.key.removeprefix("semseg_train_")
        record = adapter.load(ref)
        np.testing.assert_array_equal(record.label, decode_label_png(source[key]["label.png"]))
        assert (out / "img_dir" / "train" / f"{key}.jpg").read_bytes() == source[key]["jpg"]
        assert (out / "ann_dir" / "train" / f"{key}.png").read_bytes() == source[key]["label.png"]
    config: dict = {}
    exec((out / "mmseg_train.py").read_text(), config)  # the snippet is valid Python with the right values
    assert config["reduce_zero_label"] is False and config["ignore_index"] == 255
    assert config["metainfo"]["classes"] == load_vocab("toy").names
    assert config["train_dataset"]["data_prefix"] == {"img_path": "img_dir/train", "seg_map_path": "ann_dir/train"}
    meta = json.loads((out / "segetl_export_train.json").read_text())
    assert (meta["num_samples"], meta["label_dtype"], meta["source"]["fingerprint"]) == \
        (6, "uint8", demo_pseudolabels.fingerprint)


def test_uint16_labels_round_trip_through_coco_and_mmseg(tmp_path):
    vocab = big_vocab()
    base = np.array([[0, 300, 846, 65535], [846, 846, 300, 0]], dtype=np.uint16)
    labels = {"a": np.tile(base, (3, 2)), "b": np.tile(base[::-1], (2, 3))}
    node = publish(str(tmp_path / "src"), "pl", vocab, [[label_sample(k, v, vocab, seed=i)]
                                                       for i, (k, v) in enumerate(labels.items())])
    assert export(node, "coco", tmp_path / "coco") == 0 and export(node, "mmseg", tmp_path / "mmseg") == 0
    coco = COCOAdapter(str(tmp_path / "coco" / "annotations" / "semantic_train.json"), vocab=vocab,
                       image_root=str(tmp_path / "coco" / "images" / "train"), split="train", unannotated="ignore")
    semseg = build_adapter({"kind": "semseg", "root": str(tmp_path / "mmseg"), "vocab": vocab})
    for adapter, prefix in ((coco, "coco_train_"), (semseg, "semseg_train_")):
        read = {r.key.removeprefix(prefix): adapter.load(r).label for r in adapter.list_items()}
        assert sorted(read) == ["a", "b"]
        for key, label in labels.items():
            assert read[key].dtype == np.uint16
            np.testing.assert_array_equal(read[key], label)


def test_hf_parquet_loads_with_image_features_and_counts(demo_pseudolabels, tmp_path):
    import datasets

    out = tmp_path / "hf"
    assert export(demo_pseudolabels.path, "hf", out, "--split", "validation") == 0
    files = sorted(str(p) for p in (out / "data").glob("validation-*.parquet"))
    assert [Path(f).name for f in files] == ["validation-00000-of-00002.parquet", "validation-00001-of-00002.parquet"]
    dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(dataset.features["image"], datasets.Image) and isinstance(dataset.features["label"],
                                                                                  datasets.Image)
    assert len(dataset) == demo_pseudolabels.num_samples == 6
    source = source_samples(demo_pseudolabels)
    for row in dataset:
        label = np.asarray(row["label"])
        assert label.dtype == np.uint8 and row["image"].mode == "RGB"
        np.testing.assert_array_equal(label, decode_label_png(source[row["key"]]["label.png"]))
    id2label = json.loads((out / "id2label.json").read_text())
    assert id2label == {str(i): n for i, n in enumerate(load_vocab("toy").names)}
    assert json.loads((out / "label2id.json").read_text())["dog"] == 9


def test_eval_predictions_export_one_method_and_failures_are_rows(tmp_path):
    from pipeline.sample_files import encode_label_png

    vocab = load_vocab("toy")
    preds = {"a": np.full((4, 6), 3, dtype=np.uint8), "b": np.full((4, 6), 5, dtype=np.uint8)}
    files = [SampleOutput(k, {"maskclip.png": encode_label_png(v), "ifseg.png": encode_label_png(v * 0),
                              "json": json.dumps({"key": k, "source": f"toyworld://val/{i}"}).encode()})
             for i, (k, v) in enumerate(preds.items())]
    methods = {"methods": [{"name": "maskclip"}, {"name": "ifseg"}]}
    node = publish(str(tmp_path / "src"), "eval", vocab, [files], schema="eval/1", config=methods)
    assert export(node, "coco", tmp_path / "ambiguous") == 2
    assert export(node, "coco", tmp_path / "coco", "--method", "maskclip") == 0
    semantic = json.loads((tmp_path / "coco" / "annotations" / "semantic_train.json").read_text())
    assert [a["category_id"] for a in semantic["annotations"]] == [4, 6]
    assert [i["file_name"] for i in semantic["images"]] == ["toyworld://val/0", "toyworld://val/1"]
    # mmseg needs the images, which eval outputs do not store: every sample is a failed row, and the run exits 1
    assert export(node, "mmseg", tmp_path / "mmseg", "--method", "maskclip") == 1
    import pyarrow.parquet as pq

    sidecars = list((tmp_path / "mmseg" / ".segetl" / "export").glob("*/000000.parquet"))
    rows = pq.read_table(sidecars[0]).to_pylist()
    assert [r["status"] for r in rows] == ["failed", "failed"] and "no image" in rows[0]["error"]


def test_an_export_node_in_a_preset_is_skipped_when_its_source_is_unchanged(demo_pseudolabels):
    from label_fixtures import DEMO_PSEUDOLABEL

    from pipeline.run import compose, run

    root = Path(demo_pseudolabels.path).parents[1]
    overrides = [f"output_root={root}", *DEMO_PSEUDOLABEL, "stages=[pseudolabel,to_mmseg]", "+stage@to_mmseg=export",
                 "+to_mmseg.inputs={labels:pseudolabel}", "to_mmseg.format=mmseg"]
    first = run(compose("demo", overrides))
    assert [(s.node, s.status, s.samples) for s in first] == [("pseudolabel", "up to date", 6), ("to_mmseg", "ran", 6)]
    exported = open_stage(str(root / "to_mmseg"))
    assert len(list(Path(exported.path, "mmseg", "ann_dir", "train").glob("*.png"))) == 6
    again = run(compose("demo", overrides))
    assert [s.status for s in again] == ["up to date", "up to date"]
    changed = run(compose("demo", [*overrides, "to_mmseg.split=val"]))
    assert [s.status for s in changed] == ["up to date", "ran"]


def test_hf_shard_file_appears_only_complete_and_a_failed_attempt_is_discarded(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.export.formats import Converted
    from pipeline.export.hf import ROW_GROUP, HfFormat
    from pipeline.export.source import SourceInfo
    from pipeline.export.writer import ExportTarget

    info = SourceInfo("pl", "fp", "pseudolabel/1", "label.png", load_vocab("toy"), ())
    fmt = HfFormat(ExportTarget(str(tmp_path)), "train", info)
    path = tmp_path / fmt.shard_file(0, 1)

    def row(key: str) -> Converted:
        return Converted(key, {}, {}, {"key": key, "image": {"bytes": b"i", "path": "i"},
                                       "label": {"bytes": b"l", "path": "l"}})

    fmt.begin_shard(0, 1)
    for i in range(ROW_GROUP + 1):  # a row group is written: the file is open
        fmt.write(row(f"first{i}"))
    assert not path.exists()
    fmt.begin_shard(0, 1)  # the executor retries the shard after a failure
    fmt.write(row("retry"))
    assert not path.exists()
    fmt.end_shard()
    assert pq.read_table(path).column("key").to_pylist() == ["retry"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
