"""Review report for manufactured labels (pseudolabel, selftrain): `report/report.md` + PNGs beside the manifest.

Called from a stage's `finalize` with what it has then: its output URL, its vocabulary, the shards' done-markers
and, when the input had ground truth, the summed quality confusion matrices. Cost is bounded: at most
`ReportConfig.max_images` samples are read, spread evenly over the shards; everything derived from them says so.

    report/report.md              summary, per-class table, quality vs ground truth, least-confident images
    report/report.json            the same numbers as data
    report/scores.png             mask-score histogram per producer (stage11 / stage12 / selftrain ...)
    report/coverage.png           histogram of the labelled fraction per image
    report/classes/<id>.png       gallery per class: image | label overlay | masks outlined, up to `per_class` rows
    report/least_confident.png    the `least_confident` images with the lowest area-weighted mask score

Per-class IoU against ground truth comes from the dataset-level matrices (every image, not the sample): for a
matrix with M + 1 prediction columns (pseudolabel: the last counts unlabelled pixels) the IoU of the M x M block
over labelled pixels and the coverage; for an M x M matrix (selftrain: model-labelled pixels) its IoU. Both are
`pipeline.metrics.compute_metrics`, the numbers the stages put in their manifests.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.metrics import ConfusionMatrix, compute_metrics, to_json
from pipeline.report import make_palette, overlay
from pipeline.sample_files import IMAGE_EXTENSIONS, decode_image_rgb, decode_label_png, rle_to_mask
from pipeline.shards import ShardDone, join, write_atomic
from pipeline.tar_samples import iter_tar_samples

if TYPE_CHECKING:
    from pipeline.data.vocab import Vocabulary

REPORT_DIR = "report"
TITLE = 14  # px, title row of a strip
SCORE_BINS = 10


@dataclass
class ReportConfig:
    """Knobs of the label review report (a stage's `report:` config key).

    Attributes:
        enabled: write the report at all.
        max_images: samples read from the shards (spread over them); bounds the report's cost.
        per_class: gallery rows per class.
        least_confident: images listed as least confident.
        panel_side: long side of each gallery panel in px.
    """

    enabled: bool = True
    max_images: int = 64
    per_class: int = 4
    least_confident: int = 8
    panel_side: int = 192


@dataclass
class ImageStats:
    """What the report keeps of one sampled image (the strip is small: panels of `panel_side` px)."""

    key: str
    coverage: float
    confidence: float
    num_masks: int
    size: int  # pixels of the image
    pixels: np.ndarray  # [M] int64 labelled pixels per class
    masks: np.ndarray  # [M] int64 masks per class
    strip: Image.Image = field(repr=False)


def write_label_report(output_url: str, vocab: Vocabulary, done: Sequence[ShardDone],
                       quality: Mapping[str, ConfusionMatrix] | None = None,
                       config: ReportConfig | None = None, title: str = "Label review") -> dict[str, Any]:
    """Write the report (see module doc) under `<output_url>/report/`.

    Args:
        output_url: the stage's fingerprint directory (its shards are `<done.shard>.tar` there).
        vocab: the labels' vocabulary.
        done: the done-markers of all shards, in order.
        quality: name -> summed confusion matrix against ground truth ([M+1] or [M] classes), or None.
        config: the stage's `report` knobs.
        title: heading of report.md.

    Returns:
        Manifest fields: {"report": {"path": "report/report.md", "images_sampled": n, "images_total": N}}.
    """
    config = config or ReportConfig()
    if not config.enabled:
        return {}
    palette = make_palette(vocab.num_classes)
    images, scores = _read_sample(output_url, vocab, done, config, palette)
    numbers = report_numbers(vocab, images, scores, quality or {}, sum(d.count for d in done))
    fs, path = fsspec.core.url_to_fs(output_url)
    out = join(path, REPORT_DIR)
    pngs = {"scores.png": histogram_png("mask score", scores, (0.0, 1.0)),
            "coverage.png": histogram_png("labelled fraction per image", {"images": [i.coverage for i in images]},
                                          (0.0, 1.0))}
    galleries = _galleries(vocab, images, config)
    pngs |= {f"classes/{class_id}.png": strip for class_id, strip in galleries.items()}
    least = sorted(images, key=lambda i: (i.confidence, i.key))[: config.least_confident]
    if least:
        pngs["least_confident.png"] = stack([i.strip for i in least])
    for name, image in pngs.items():
        write_atomic(fs, join(out, name), _png(image))
    numbers["least_confident"] = [{"key": i.key, "confidence": i.confidence, "coverage": i.coverage,
                                   "num_masks": i.num_masks} for i in least]
    write_atomic(fs, join(out, "report.json"), to_json(numbers).encode())
    write_atomic(fs, join(out, "report.md"), render_markdown(title, vocab, numbers, sorted(galleries)).encode())
    return {"report": {"path": f"{REPORT_DIR}/report.md", "images_sampled": len(images),
                       "images_total": numbers["images_total"]}}


def sample_shards(done: Sequence[ShardDone], max_images: int) -> list[tuple[str, int]]:
    """(shard name, samples to read) for at most `max_images` samples spread evenly over the non-empty shards."""
    full = [d for d in done if d.count > 0]
    if not full or max_images <= 0:
        return []
    picked = sorted({int(round(i)) for i in np.linspace(0, len(full) - 1, min(len(full), max_images))})
    quota = math.ceil(max_images / len(picked))
    plan, left = [], max_images
    for index in picked:
        take = min(quota, full[index].count, left)
        plan.append((full[index].shard, take))
        left -= take
    return [(name, take) for name, take in plan if take > 0]


def _read_sample(output_url: str, vocab: Vocabulary, done: Sequence[ShardDone], config: ReportConfig,
                 palette: np.ndarray) -> tuple[list[ImageStats], dict[str, list[float]]]:
    images: list[ImageStats] = []
    scores: dict[str, list[float]] = {}
    for sample in _samples(output_url, sample_shards(done, config.max_images)):
        label = decode_label_png(sample["label.png"])
        masks = json.loads(sample.get("masks.json", b"[]"))
        for entry in masks:
            scores.setdefault(entry["producer"], []).append(float(entry["score"]))
        images.append(image_stats(sample, label, masks, vocab, palette, config.panel_side))
    return images, scores


def _samples(output_url: str, plan: Sequence[tuple[str, int]]) -> Iterator[dict[str, Any]]:
    for name, take in plan:
        for position, sample in enumerate(iter_tar_samples(join(output_url, f"{name}.tar"))):
            if position >= take:
                break
            yield sample


def image_stats(sample: Mapping[str, Any], label: np.ndarray, masks: Sequence[Mapping[str, Any]],
                vocab: Vocabulary, palette: np.ndarray, side: int) -> ImageStats:
    """Coverage, area-weighted mean mask score (0 without masks), per-class pixels and the review strip."""
    labelled = label != vocab.ignore_index
    pixels = np.bincount(label[labelled].astype(np.int64), minlength=vocab.num_classes)[: vocab.num_classes]
    areas = np.array([float(m["area"]) for m in masks])
    confidence = float(np.average([float(m["score"]) for m in masks], weights=areas)) \
        if masks and areas.sum() > 0 else 0.0
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    image = decode_image_rgb(sample[ext]) if ext else np.full((*label.shape, 3), 128, dtype=np.uint8)
    coverage = float(labelled.mean()) if label.size else 0.0
    title = f"{sample['__key__']}  coverage {coverage:.0%}  score {confidence:.2f}  masks {len(masks)}"
    strip = review_strip(image, label, masks, palette, side, title)
    per_class = np.bincount([int(m["category_id"]) for m in masks], minlength=vocab.num_classes)[: vocab.num_classes]
    return ImageStats(sample["__key__"], coverage, confidence, len(masks), int(label.size), pixels, per_class, strip)


def review_strip(image: np.ndarray, label: np.ndarray, masks: Sequence[Mapping[str, Any]], palette: np.ndarray,
                 side: int, title: str) -> Image.Image:
    """image | label overlay | masks outlined (each in its class colour), scaled to `side` px, with a title."""
    scale = min(1.0, side / max(label.shape))
    size = (max(1, round(label.shape[1] * scale)), max(1, round(label.shape[0] * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    small_label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    outlined = small.copy()
    for entry in masks:
        mask = np.asarray(Image.fromarray(rle_to_mask(entry["segmentation"])).resize(size, Image.NEAREST))
        outlined[_outline(mask)] = palette[int(entry["category_id"]) % len(palette)]
    panels = [small, overlay(small, small_label.astype(np.int64), palette), outlined]
    strip = Image.new("RGB", (3 * size[0] + 8, size[1] + TITLE), "white")
    for slot, panel in enumerate(panels):
        strip.paste(Image.fromarray(panel), (slot * (size[0] + 4), TITLE))
    ImageDraw.Draw(strip).text((2, 1), title, fill="black", font=ImageFont.load_default())
    return strip


def _outline(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels of `mask` with a 4-neighbour outside it."""
    from scipy.ndimage import binary_erosion

    mask = mask.astype(bool)
    return mask & ~binary_erosion(mask, border_value=0)


def stack(strips: Sequence[Image.Image]) -> Image.Image:
    """Strips one below the other (left-aligned, white background)."""
    canvas = Image.new("RGB", (max(s.width for s in strips), sum(s.height + 4 for s in strips)), "white")
    top = 0
    for strip in strips:
        canvas.paste(strip, (0, top))
        top += strip.height + 4
    return canvas


def _galleries(vocab: Vocabulary, images: Sequence[ImageStats], config: ReportConfig) -> dict[int, Image.Image]:
    """Class id -> up to `per_class` strips of the sampled images with the most pixels of that class."""
    galleries = {}
    for class_id in range(vocab.num_classes):
        having = sorted((i for i in images if i.pixels[class_id] > 0), key=lambda i: (-i.pixels[class_id], i.key))
        if having and config.per_class > 0:
            galleries[class_id] = stack([i.strip for i in having[: config.per_class]])
    return galleries


def quality_numbers(matrix: ConfusionMatrix, names: Sequence[str]) -> dict[str, Any]:
    """Per-class IoU (labelled pixels), mIoU and, for an [M+1] matrix, coverage (% of valid-GT pixels labelled)."""
    num_classes, full = len(names), matrix.matrix
    metrics = compute_metrics(full[:num_classes, :num_classes], list(names))
    out = {"mIoU": metrics["mIoU"], "per_class_iou": metrics["per_class_iou"], "coverage": None}
    if full.shape[0] == num_classes + 1 and full.sum() > 0:
        out["coverage"] = 100.0 * float(full[:, :num_classes].sum()) / float(full.sum())
    return out


def report_numbers(vocab: Vocabulary, images: Sequence[ImageStats], scores: Mapping[str, Sequence[float]],
                   quality: Mapping[str, ConfusionMatrix], total: int) -> dict[str, Any]:
    """All numbers of the report (JSON-safe): sampled class stats, score/coverage histograms, quality."""
    zeros = np.zeros(vocab.num_classes, np.int64)
    pixels = np.sum([i.pixels for i in images], axis=0) if images else zeros
    masks = np.sum([i.masks for i in images], axis=0) if images else zeros
    all_pixels = sum(i.size for i in images)
    per_class = [{"id": c, "name": n, "pixels": int(pixels[c]),
                  "pixels_pct": 100.0 * float(pixels[c]) / all_pixels if all_pixels else 0.0,
                  "images": sum(int(i.pixels[c] > 0) for i in images), "masks": int(masks[c])}
                 for c, n in enumerate(vocab.names)]
    return {
        "images_total": total, "images_sampled": len(images), "per_class": per_class,
        "mean_coverage": float(np.mean([i.coverage for i in images])) if images else None,
        "score_histograms": {p: _bins(v, (0.0, 1.0)) for p, v in sorted(scores.items())},
        "coverage_histogram": _bins([i.coverage for i in images], (0.0, 1.0)),
        "quality": {name: quality_numbers(m, vocab.names) for name, m in sorted(quality.items())},
    }


def _bins(values: Sequence[float], bounds: tuple[float, float]) -> list[int]:
    return np.histogram(np.clip(values, *bounds), bins=SCORE_BINS, range=bounds)[0].astype(int).tolist()


def histogram_png(title: str, series: Mapping[str, Sequence[float]], bounds: tuple[float, float]) -> Image.Image:
    """One bar chart per series (SCORE_BINS bins over `bounds`), side by side, titled with the series name."""
    width, height, pad = 220, 120, 16
    names = sorted(series) or ["(none)"]
    canvas = Image.new("RGB", (len(names) * (width + pad), height + 3 * TITLE), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for slot, name in enumerate(names):
        counts = _bins(series.get(name, []), bounds)
        left, peak = slot * (width + pad), max(1, max(counts))
        draw.text((left + 2, 1), f"{title}: {name} (n={sum(counts)})", fill="black", font=font)
        bar = width / SCORE_BINS
        for index, count in enumerate(counts):
            top = TITLE + height - round(height * count / peak)
            draw.rectangle([left + index * bar + 1, top, left + (index + 1) * bar - 1, TITLE + height], fill="#4477aa")
        draw.text((left, TITLE + height + 2), f"{bounds[0]:g}", fill="black", font=font)
        draw.text((left + width - 12, TITLE + height + 2), f"{bounds[1]:g}", fill="black", font=font)
    return canvas


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pct(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.2f}"


def render_markdown(title: str, vocab: Vocabulary, numbers: Mapping[str, Any], gallery_ids: Sequence[int]) -> str:
    """report.md from `report_numbers` (plus the least-confident list)."""
    quality = numbers["quality"]
    lines = [f"# {title}", "", f"{numbers['images_sampled']} of {numbers['images_total']} images read for the "
             "sampled statistics and pictures (spread over the shards); quality against ground truth uses every "
             "image.", "", f"Mean labelled fraction per image: {_pct((numbers['mean_coverage'] or 0) * 100)} %", ""]
    if quality:
        lines += ["## Quality against ground truth (%)", "", "| labels | coverage | mIoU (labelled pixels) |",
                  "|---|---|---|"]
        lines += [f"| {name} | {_pct(q['coverage'])} | {_pct(q['mIoU'])} |" for name, q in quality.items()]
        lines.append("")
    names = list(quality)
    lines += ["## Per class", "", "pixels % / images / masks: sampled images; IoU: all images, labelled pixels.", "",
              "| id | class | pixels % | images | masks |" + "".join(f" IoU {n} |" for n in names),
              "|---" * (5 + len(names)) + "|"]
    for row in numbers["per_class"]:
        ious = "".join(f" {_pct(quality[n]['per_class_iou'].get(row['name']))} |" for n in names)
        link = f"[{row['name']}](classes/{row['id']}.png)" if row["id"] in gallery_ids else row["name"]
        lines.append(f"| {row['id']} | {link} | {row['pixels_pct']:.2f} | {row['images']} | {row['masks']} |{ious}")
    lines += ["", "## Scores and coverage", "", "![mask scores per producer](scores.png)", "",
              "![labelled fraction per image](coverage.png)", "", "## Least-confident images", "",
              "Area-weighted mean mask score (0 when an image has no mask).", "",
              "| key | score | coverage | masks |", "|---|---|---|---|"]
    lines += [f"| {i['key']} | {i['confidence']:.3f} | {100 * i['coverage']:.1f} % | {i['num_masks']} |"
              for i in numbers["least_confident"]]
    if numbers["least_confident"]:
        lines += ["", "![least-confident images](least_confident.png)"]
    lines += ["", "## Galleries", "", "Each row: image | label overlay (black = unlabelled) | masks outlined.", ""]
    lines += [f"- [{vocab.names[c]}](classes/{c}.png)" for c in gallery_ids]
    return "\n".join(lines) + "\n"
