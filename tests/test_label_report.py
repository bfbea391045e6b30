"""The review report for manufactured labels, on a real pseudolabel output of the demo: its files exist, its quality
numbers equal the manifest's, its sampled statistics equal the label maps', and its cost is bounded."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.data.vocab import Vocabulary
from pipeline.label_report import ReportConfig, sample_shards, write_label_report
from pipeline.metrics import ConfusionMatrix, compute_metrics
from pipeline.sample_files import decode_label_png
from pipeline.shards import StageOutput, open_stage, read_done

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def copy_of(output: StageOutput, tmp_path: Path) -> tuple[StageOutput, list, Vocabulary]:
    target = tmp_path / "pseudolabel" / output.fingerprint
    shutil.copytree(output.path, target)
    copy = open_stage(str(target))
    fs, path = fsspec.core.url_to_fs(copy.path)
    done = [read_done(fs, path, i, copy.fingerprint) for i in range(len(copy.manifest["shards"]))]
    return copy, done, Vocabulary.from_dict(copy.manifest["vocab"])


def quality_matrices(done: list) -> dict[str, ConfusionMatrix]:
    from pipeline.metrics import sum_matrices

    names = sorted({name for d in done for name in d.extra["quality"]})
    return {name: sum_matrices(d.extra["quality"][name] for d in done) for name in names}


def same(a: float | None, b: float | None) -> bool:
    """Equal numbers, or both undefined (None in JSON, NaN in memory)."""
    a, b = (None if v is None or math.isnan(v) else v for v in (a, b))
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, abs_tol=1e-9))


def test_report_files_exist_and_its_numbers_equal_the_manifest_quality(demo_pseudolabels, tmp_path):
    output, done, vocab = copy_of(demo_pseudolabels, tmp_path)
    fields = write_label_report(output.path, vocab, done, quality_matrices(done))
    assert fields == {"report": {"path": "report/report.md", "images_sampled": 6, "images_total": 6}}
    report = Path(output.path, "report")
    numbers = json.loads((report / "report.json").read_text())
    manifest_quality = output.manifest["quality"]
    assert sorted(numbers["quality"]) == ["merged", "stage11", "stage12"]
    markdown = (report / "report.md").read_text()
    for name, ours in numbers["quality"].items():
        theirs = manifest_quality[name]
        assert same(ours["coverage"], theirs["coverage"]) and same(ours["mIoU"], theirs["mIoU_labelled"])
        assert all(same(ours["per_class_iou"][c], theirs["per_class_iou_labelled"][c]) for c in vocab.names)
        assert f"| {name} | {theirs['coverage']:.2f} | {theirs['mIoU_labelled']:.2f} |" in markdown
    pixels, masks = np.zeros(vocab.num_classes, np.int64), np.zeros(vocab.num_classes, np.int64)
    for sample in output.samples():
        label = decode_label_png(sample["label.png"])
        pixels += np.bincount(label[label != 255], minlength=vocab.num_classes)
        for entry in json.loads(sample["masks.json"]):
            masks[entry["category_id"]] += 1
    assert [row["pixels"] for row in numbers["per_class"]] == pixels.tolist()
    assert [row["masks"] for row in numbers["per_class"]] == masks.tolist()
    scores = [json.loads(s["masks.json"]) for s in output.samples()]
    for producer, histogram in numbers["score_histograms"].items():
        assert sum(histogram) == sum(e["producer"] == producer for entries in scores for e in entries)
    pngs = ["scores.png", "coverage.png", "least_confident.png", *(f"classes/{c}.png" for c in np.flatnonzero(pixels))]
    for name in pngs:
        with Image.open(report / name) as image:
            assert image.width > 100 and image.height > 20, name
        assert f"]({name})" in markdown
    assert len(numbers["least_confident"]) == 6
    assert [i["confidence"] for i in numbers["least_confident"]] == sorted(i["confidence"]
                                                                          for i in numbers["least_confident"])


def test_report_reads_a_bounded_sample_spread_over_the_shards(demo_pseudolabels, tmp_path):
    output, done, vocab = copy_of(demo_pseudolabels, tmp_path)
    assert sample_shards(done, 2) == [("000000", 1), ("000001", 1)]
    fields = write_label_report(output.path, vocab, done, None, ReportConfig(max_images=2, per_class=1))
    assert fields["report"]["images_sampled"] == 2
    numbers = json.loads(Path(output.path, "report", "report.json").read_text())
    assert numbers["quality"] == {} and numbers["images_sampled"] == 2 and numbers["images_total"] == 6
    assert write_label_report(output.path, vocab, done, None, ReportConfig(enabled=False)) == {}


def test_selftrain_style_quality_matrix_gives_its_own_iou(demo_pseudolabels, tmp_path):
    output, done, vocab = copy_of(demo_pseudolabels, tmp_path)
    matrix = ConfusionMatrix(vocab.num_classes)
    rng = np.random.default_rng(0)
    matrix.update(rng.integers(0, 4, size=(16, 16)), rng.integers(0, 4, size=(16, 16)))
    write_label_report(output.path, vocab, done, {"selftrain": matrix}, ReportConfig(max_images=1))
    numbers = json.loads(Path(output.path, "report", "report.json").read_text())["quality"]["selftrain"]
    expected = compute_metrics(matrix.matrix, list(vocab.names))
    assert numbers["coverage"] is None and same(numbers["mIoU"], expected["mIoU"])
    assert all(same(numbers["per_class_iou"][c], expected["per_class_iou"][c]) for c in vocab.names)


def test_the_pseudolabel_stage_writes_its_own_review_report(demo_pseudolabels):
    output = demo_pseudolabels
    assert output.manifest["report"] == {"path": "report/report.md", "images_sampled": 6, "images_total": 6}
    numbers = json.loads(Path(output.path, "report", "report.json").read_text())
    assert sorted(numbers["quality"]) == ["merged", "stage11", "stage12"]
    for name, ours in numbers["quality"].items():
        assert same(ours["mIoU"], output.manifest["quality"][name]["mIoU_labelled"])
