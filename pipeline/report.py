"""Markdown evaluation report: metric tables plus per-sample image | ground truth | prediction overlays.

Layout of `out_dir` (a local path or any fsspec URL):
    report.md            metric table (methods × mIoU/pAcc/mIoU(S)/mIoU(U)/hIoU), per-class IoU table
    legend.png           colour swatch and name for every class
    samples/<key>.png    one strip per sample: image | ground truth | one panel per method, titled, with a
                         legend of the classes present in that sample underneath

Drawing uses PIL only, with PIL's default font. Ignore pixels (and any id outside the palette) are drawn
black; class colours never use black.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.shards import write_atomic

TITLE_HEIGHT = 16  # px, title bar above each panel
PANEL_GAP = 4  # px between panels
LEGEND_ROW = 16  # px per legend row
LEGEND_COLUMN = 160  # px per legend column
SUMMARY_KEYS = ("mIoU", "pAcc", "mIoU(S)", "mIoU(U)", "hIoU")
Sample = tuple[str, np.ndarray, np.ndarray, Mapping[str, np.ndarray]]


def make_palette(num_classes: int) -> np.ndarray:
    """Deterministic, well-separated colours: [num_classes, 3] uint8 RGB, never pure black.

    Class c gets the Pascal VOC bit-interleaved colour of index c + 1 (VOC index 0 is black, which is
    reserved for ignore here).
    """
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for class_id in range(num_classes):
        index, rgb = class_id + 1, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((index >> channel) & 1) << shift
            index >>= 3
        palette[class_id] = rgb
    return palette


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """[H, W] int ids -> [H, W, 3] uint8 colours; ids outside [0, len(palette)) (ignore) are black."""
    label = np.asarray(label, dtype=np.int64)
    valid = (label >= 0) & (label < len(palette))
    out = np.zeros((*label.shape, 3), dtype=np.uint8)
    out[valid] = palette[label[valid]]
    return out


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend label colours over an [H, W, 3] uint8 image with weight `alpha`; ignore pixels are black."""
    colours = colorize(label, palette).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    valid = (label >= 0) & (label < len(palette))
    return np.where(valid[..., None], blended, 0.0).round().astype(np.uint8)


def _fit(array: np.ndarray, max_side: int, nearest: bool) -> Image.Image:
    """PIL image of `array`, scaled down so that its long side is at most `max_side` px."""
    img = Image.fromarray(array)
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.NEAREST if nearest else Image.BILINEAR)
    return img


def draw_legend(class_ids: Sequence[int], names: Sequence[str], palette: np.ndarray, width: int) -> Image.Image:
    """Legend strip: a swatch and name per class, in columns of LEGEND_COLUMN px that fill `width` px."""
    font = ImageFont.load_default()
    columns = max(1, width // LEGEND_COLUMN)
    rows = max(1, math.ceil(len(class_ids) / columns))
    strip = Image.new("RGB", (width, rows * LEGEND_ROW), "white")
    draw = ImageDraw.Draw(strip)
    for slot, class_id in enumerate(class_ids):
        x, y = (slot // rows) * LEGEND_COLUMN, (slot % rows) * LEGEND_ROW
        draw.rectangle([x + 2, y + 2, x + LEGEND_ROW - 2, y + LEGEND_ROW - 2], fill=tuple(palette[class_id].tolist()))
        draw.text((x + LEGEND_ROW + 2, y + 2), f"{class_id} {names[class_id]}", fill="black", font=font)
    return strip


def render_sample(
    image: np.ndarray,
    gt: np.ndarray,
    preds: Mapping[str, np.ndarray],
    names: Sequence[str],
    palette: np.ndarray,
    max_panel_side: int = 512,
) -> Image.Image:
    """One sample strip: titled panels image | ground truth | each prediction, then its legend.

    Args:
        image: [H, W, 3] uint8 RGB.
        gt: [H, W] int ids (ignore drawn black).
        preds: method name -> [H, W] int ids.
        names: class names in id order.
        palette: [C, 3] uint8 colours.
        max_panel_side: long side of each panel in px (larger images are scaled down).
    """
    for what, label in (("ground truth", gt), *preds.items()):
        if np.shape(label) != image.shape[:2]:
            raise ValueError(f"{what} has shape {np.shape(label)}, image is {image.shape[:2]}")
    labelled = [("ground truth", gt), *preds.items()]
    panels = [("image", _fit(image, max_panel_side, nearest=False))]
    panels += [(title, _fit(overlay(image, label, palette), max_panel_side, nearest=True)) for title, label in labelled]
    panel_w, panel_h = panels[0][1].size
    width = len(panels) * panel_w + (len(panels) - 1) * PANEL_GAP
    present = np.unique(np.concatenate([np.ravel(gt), *(np.ravel(p) for p in preds.values())]))
    present = [int(c) for c in present if 0 <= c < len(palette)]
    legend = draw_legend(present, names, palette, width)
    canvas = Image.new("RGB", (width, TITLE_HEIGHT + panel_h + legend.height), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for slot, (title, panel) in enumerate(panels):
        x = slot * (panel_w + PANEL_GAP)
        draw.text((x + 2, 2), title, fill="black", font=font)
        canvas.paste(panel, (x, TITLE_HEIGHT))
    canvas.paste(legend, (0, TITLE_HEIGHT + panel_h))
    return canvas


def _fmt(value: Any) -> str:
    """Metric cell: 2 decimals, "–" for missing/undefined (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value):.2f}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|")


def metric_table(metrics_by_method: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: one row per method, columns mIoU, pAcc, mIoU(S), mIoU(U), hIoU (percent)."""
    lines = ["| method | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
    for method, metrics in metrics_by_method.items():
        lines.append(f"| {_cell(method)} | " + " | ".join(_fmt(metrics.get(key)) for key in SUMMARY_KEYS) + " |")
    return "\n".join(lines)


def per_class_table(metrics_by_method: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
    """Markdown table: one row per class (id, name), one IoU column per method (percent)."""
    methods = list(metrics_by_method)
    lines = ["| id | class | " + " | ".join(_cell(m) for m in methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for class_id, name in enumerate(names):
        cells = [_fmt(metrics_by_method[m].get("per_class_iou", {}).get(name)) for m in methods]
        lines.append(f"| {class_id} | {_cell(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _protocol_lines(metrics_by_method: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Bullet per method whose metrics carry a "protocol" dict (the settings that produced them)."""
    lines = []
    for method, metrics in metrics_by_method.items():
        protocol = metrics.get("protocol")
        if isinstance(protocol, Mapping):
            lines.append(f"- **{method}**: " + ", ".join(f"{k}={v}" for k, v in protocol.items()))
    return ["## Protocols", "", *lines, ""] if lines else []


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _safe_name(key: str) -> str:
    """File-system-safe stem of a sample key (anything but [A-Za-z0-9_-] becomes "_")."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key) or "sample"


def write_report(
    out_dir: str,
    metrics_by_method: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    samples: Sequence[Sample] = (),
    palette: np.ndarray | None = None,
    max_panel_side: int = 512,
    title: str = "Evaluation report",
) -> str:
    """Write report.md, legend.png and samples/<key>.png under `out_dir`; return the report.md path.

    Args:
        out_dir: local directory or fsspec URL (created if missing).
        metrics_by_method: method name -> `compute_metrics` output (NaN or None for undefined values);
            an optional "protocol" dict per method is listed in a Protocols section.
        names: class names in id order.
        samples: (key, image [H, W, 3] uint8, gt [H, W] int, {method: pred [H, W] int}).
        palette: [C, 3] uint8 class colours; `make_palette(len(names))` when None.
        max_panel_side: long side of each sample panel in px.
        title: heading of the report.
    """
    import fsspec

    palette = make_palette(len(names)) if palette is None else np.asarray(palette, dtype=np.uint8)
    if len(palette) < len(names):
        raise ValueError(f"palette has {len(palette)} colours for {len(names)} classes")
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(f"{root}/samples", exist_ok=True)
    legend = draw_legend(range(len(names)), names, palette, 4 * LEGEND_COLUMN)
    write_atomic(fs, f"{root}/legend.png", _png_bytes(legend))
    lines = [f"# {title}", "", "## Metrics (%)", "", metric_table(metrics_by_method), ""]
    lines += _protocol_lines(metrics_by_method)
    lines += ["## Per-class IoU (%)", "", per_class_table(metrics_by_method, names), "", "## Samples", ""]
    lines += ["Colours: ![legend](legend.png) (black = ignore).", ""]
    for key, image, gt, preds in samples:
        stem = _safe_name(key)
        strip = render_sample(image, np.asarray(gt), preds, names, palette, max_panel_side)
        write_atomic(fs, f"{root}/samples/{stem}.png", _png_bytes(strip))
        lines += [f"### {key}", "", f"![{stem}](samples/{stem}.png)", ""]
    report_path = f"{root}/report.md"
    write_atomic(fs, report_path, "\n".join(lines).encode("utf-8"))
    return report_path if _is_local(fs) else fs.unstrip_protocol(report_path)


def _is_local(fs: Any) -> bool:
    """True for the local file system."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
