"""Pseudo-label quality against ground truth (`stages.pseudolabel.quality`): the three maps, both mIoUs, the file."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pipeline.data.vocab import load_vocab
from stages.pseudolabel.quality import (
    QUALITY_FILE,
    QualityAccumulator,
    finalize_quality,
    merge_quality,
    summarize_quality,
)
from stages.pseudolabel.steps import LabelledMask


def test_quality_reports_coverage_and_both_mious() -> None:
    vocab = load_vocab("toy")
    quality = QualityAccumulator(vocab)
    gt = np.array([[0, 0, 255], [1, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 255, 5], [1, 0, 1]], dtype=np.uint8)
    quality.update(gt[:, :2], {"merged": pred[:, :2]})
    quality.update(gt[:, 2:], {"merged": pred[:, 2:]})
    summary = summarize_quality(merge_quality([quality.pop()]), vocab.names)["merged"]
    # labelled only: IoU0 = 1 / (1 + 2 - 1), IoU1 = 2 / (3 + 2 - 2); unlabelled as wrong: IoU0 = 1 / (2 + 2 - 1)
    assert summary["coverage"] == pytest.approx(100 * 4 / 5)
    assert summary["mIoU_labelled"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert summary["mIoU_unlabelled_as_wrong"] == pytest.approx(100 * (1 / 3 + 2 / 3) / 2)
    assert summary["num_valid_pixels"] == 5 and quality.pop() == {}


def _mask(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((2, 3), dtype=bool)
    mask[rows, cols] = True
    return mask


def test_each_image_adds_stage11_stage12_and_their_merge() -> None:
    quality = QualityAccumulator(load_vocab("toy"))
    gt = np.array([[0, 0, 1], [1, 1, 1]], dtype=np.uint8)
    stage11 = [LabelledMask(_mask(slice(0, 1), slice(0, 2)), 0, 0.5, "stage11")]
    stage12 = [LabelledMask(_mask(slice(0, 2), slice(0, 3)), 1, 0.9, "stage12")]
    quality.add(gt, stage11, stage12, "stage11_first")
    matrices = quality.pop()
    unlabelled = len(load_vocab("toy").names)
    assert sum(map(sum, matrices["stage11"]["matrix"])) == 6
    assert matrices["stage11"]["matrix"][1][unlabelled] == 4  # stage 1.1 leaves the four class-1 pixels unlabelled
    assert matrices["stage12"]["matrix"][0][1] == 2 and matrices["stage12"]["matrix"][1][1] == 4
    assert matrices["merged"]["matrix"][0][0] == 2 and matrices["merged"]["matrix"][1][1] == 4


@pytest.mark.parametrize("root", ["local", "memory"])
def test_finalize_writes_the_quality_file_and_returns_the_manifest_fields(tmp_path: Path, root: str) -> None:
    vocab = load_vocab("toy")
    quality = QualityAccumulator(vocab)
    quality.update(np.array([[0, 1]], np.uint8), {"merged": np.array([[0, 255]], np.uint8)})
    extras = [{"quality": quality.pop(), "num_masks": {"stage11": 2, "stage12": 1}},
              {"quality": {}, "num_masks": {"stage11": 0, "stage12": 4}}]
    url = str(tmp_path / "out") if root == "local" else f"memory://{tmp_path.name}/out"
    fields = finalize_quality(extras, vocab, "stage11_first", url)
    assert fields["num_masks"] == {"stage11": 2, "stage12": 5}
    fs, path = fsspec.core.url_to_fs(url)
    written = json.loads(fs.cat_file(f"{path}/{QUALITY_FILE}"))
    assert written["merged"]["coverage"] == pytest.approx(50.0) == fields["quality"]["merged"]["coverage"]
    assert written["vocab"] == "toy" and written["merge_policy"] == "stage11_first"
    assert [p for p in fs.ls(path, detail=False) if ".tmp" in p] == []
    assert finalize_quality(extras[1:], vocab, "stage11_first", url + "-nogt") == {"num_masks": {"stage11": 0,
                                                                                                "stage12": 4}}
    assert not fs.exists(f"{path}-nogt/{QUALITY_FILE}")
