"""Tests for pipeline.report: files, PNG geometry, colours and table contents."""

from __future__ import annotations

import io
import math
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.metrics import ConfusionMatrix, compute_metrics
from pipeline.report import (
    LEGEND_COLUMN,
    LEGEND_ROW,
    PANEL_GAP,
    TITLE_HEIGHT,
    make_palette,
    metric_table,
    render_sample,
    write_report,
)

NAMES = ["sky", "road", "car"]


def _sample(height: int = 40, width: int = 60) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    gt = np.zeros((height, width), dtype=np.int64)
    gt[height // 2 :] = 1
    gt[:5, :5] = 255
    pred_a, pred_b = gt.copy(), gt.copy()
    pred_a[:5, :5], pred_b[:5, :5] = 0, 2  # predictions on ignored pixels do not count
    pred_b[-1, -1] = 2  # one road pixel predicted as car
    return image, gt, {"ifseg": pred_a, "zegclip": pred_b}


def test_palette_is_deterministic_distinct_and_never_black() -> None:
    palette = make_palette(200)
    assert palette.shape == (200, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette, make_palette(200))
    assert len({tuple(c) for c in palette.tolist()}) == 200
    assert not np.any(np.all(palette == 0, axis=1))
    assert palette[:3].tolist() == [[128, 0, 0], [0, 128, 0], [128, 128, 0]]  # VOC colours 1, 2, 3


def test_sample_strip_geometry_colours_and_black_ignore() -> None:
    image, gt, preds = _sample()
    palette = make_palette(3)
    strip = np.array(render_sample(image, gt, preds, NAMES, palette))
    width = 4 * 60 + 3 * PANEL_GAP  # image | ground truth | ifseg | zegclip
    columns = width // LEGEND_COLUMN
    legend_rows = math.ceil(3 / columns)  # classes 0, 1, 2 present across gt and predictions
    assert strip.shape == (TITLE_HEIGHT + 40 + legend_rows * LEGEND_ROW, width, 3)
    gt_panel = strip[TITLE_HEIGHT : TITLE_HEIGHT + 40, 60 + PANEL_GAP : 120 + PANEL_GAP]
    assert np.all(gt_panel[:5, :5] == 0)  # ignore is black
    expected = np.round(0.4 * image[30, 30].astype(float) + 0.6 * palette[1]).astype(np.uint8)
    np.testing.assert_array_equal(gt_panel[30, 30], expected)
    np.testing.assert_array_equal(strip[TITLE_HEIGHT : TITLE_HEIGHT + 40, :60], image)


def test_large_panels_are_scaled_down() -> None:
    image, gt, preds = _sample(300, 900)
    strip = render_sample(image, gt, {"ifseg": preds["ifseg"]}, NAMES, make_palette(3), max_panel_side=300)
    assert strip.width == 3 * 300 + 2 * PANEL_GAP
    with pytest.raises(ValueError, match="shape"):
        render_sample(image, gt[:10], {}, NAMES, make_palette(3))


def test_write_report_files_and_tables(tmp_path: Path) -> None:
    image, gt, preds = _sample()
    metrics = {}
    for method, pred in preds.items():
        cm = ConfusionMatrix(3)
        cm.update(pred, gt)
        metrics[method] = compute_metrics(cm, NAMES, seen_ids=[0, 1])
    metrics["ifseg"]["protocol"] = {"name": "ifseg", "mode": "whole"}
    path = write_report(str(tmp_path / "rep"), metrics, NAMES, [("img/001", image, gt, preds)])
    assert path == str(tmp_path / "rep" / "report.md")
    text = Path(path).read_text()
    assert "| ifseg | 100.00 | 100.00 | 100.00 | – | – |" in text  # car has no GT and is never predicted
    # zegclip: sky 100, road 1199/1200, car predicted only -> IoU 0; pAcc 2374/2375; S = (100 + 99.92) / 2.
    assert "| zegclip | 66.64 | 99.96 | 99.96 | 0.00 | 0.00 |" in text
    assert "| 2 | car | – | 0.00 |" in text
    assert "name=ifseg, mode=whole" in text
    assert "![img_001](samples/img_001.png)" in text
    strip = Image.open(tmp_path / "rep" / "samples" / "img_001.png")
    assert strip.size[0] == 4 * 60 + 3 * PANEL_GAP
    legend = Image.open(tmp_path / "rep" / "legend.png")
    assert legend.size == (4 * LEGEND_COLUMN, LEGEND_ROW)


def test_metric_table_formats_json_nulls_and_nan() -> None:
    table = metric_table({"m|x": {"mIoU": 45.678, "pAcc": None, "hIoU": math.nan}})
    assert table.splitlines()[-1] == "| m\\|x | 45.68 | – | – | – | – |"


def test_write_report_to_fsspec_url() -> None:
    image, gt, preds = _sample(16, 16)
    url = "memory://eval-report-test/out"
    path = write_report(url, {"m": {"mIoU": 12.5}}, NAMES, [("k", image, gt, {"m": preds["ifseg"]})])
    assert path.startswith("memory://") and path.endswith("eval-report-test/out/report.md")
    with fsspec.open(path, "rt") as handle:
        assert "| m | 12.50 |" in handle.read()
    with fsspec.open(path.replace("report.md", "samples/k.png"), "rb") as handle:
        assert Image.open(io.BytesIO(handle.read())).size[0] == 3 * 16 + 2 * PANEL_GAP
