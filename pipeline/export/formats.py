"""The contract between the export stage and one output format, and what every format shares.

Per source shard, on a worker (the stage calls these; see `stages/export.py`):

    fmt.begin_shard(index, total)
    converted = fmt.convert(sample)      pure: decodes and checks one sample, builds its bytes; raises ValueError
                                         for a bad sample (it becomes a failed row); writes nothing
    fmt.write(converted)                 side effects, once per successful sample (called from `Stage.fold`)
    extra = fmt.end_shard()              closes per-shard files; JSON-safe counts for the done-marker

On the driver, after all shards: `fmt.finalize(index_urls, done)` writes the stage-level files (COCO JSON, config
snippets, label maps) from the export's own index shards, whose samples hold each `Converted.record`.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from pipeline.export.source import ExportSample, SourceInfo, source_image
from pipeline.export.writer import ExportTarget
from pipeline.sample_files import decode_label_png
from pipeline.shards import ShardDone


@dataclass
class Converted:
    """One sample, ready to write.

    Attributes:
        key: the sample's safe key.
        files: path relative to the export folder -> bytes, written by `ExportFormat.write`.
        record: JSON-safe entry kept in the export's index shard (COCO entries, written paths).
        row: one Parquet row (hf), else None.
    """

    key: str
    files: dict[str, bytes]
    record: dict[str, Any]
    row: dict[str, Any] | None = None


class ExportFormat:
    """Base of the formats; subclasses implement `convert` and usually `finalize`.

    Args:
        target: the export folder.
        split: split name (file and folder names, e.g. "train").
        info: the source description.
        category_ids: COCO category ids: "auto" (the vocabulary's source ids when it has them, else train id + 1),
            "train_id_plus_one" or "source_ids".
    """

    name: ClassVar[str] = ""

    def __init__(self, target: ExportTarget, split: str, info: SourceInfo, category_ids: str = "auto") -> None:
        self.target, self.split, self.info, self.category_ids = target, split, info, category_ids
        self.vocab = info.vocab
        self.shard_index, self.num_shards = 0, 1
        self.counts: Counter[str] = Counter()

    def begin_shard(self, index: int, total: int) -> None:
        """Start source shard `index` of `total`."""
        self.shard_index, self.num_shards = index, total
        self.counts = Counter()

    def convert(self, sample: ExportSample) -> Converted:
        raise NotImplementedError

    def write(self, converted: Converted) -> None:
        """Write the sample's files and count it."""
        for relative, data in converted.files.items():
            self.target.write(relative, data)
        self.counts["samples"] += 1
        if converted.record.get("image_ext"):
            self.counts[f"image_ext:{converted.record['image_ext']}"] += 1

    def end_shard(self) -> dict[str, Any]:
        """The shard's counts (done-marker extra)."""
        return dict(self.counts)

    def finalize(self, index_urls: Sequence[str], done: Sequence[ShardDone]) -> dict[str, Any]:
        """Write the split's stage-level files; return manifest fields."""
        return self.write_meta(done, {})

    def label_array(self, sample: ExportSample) -> np.ndarray:
        """[H, W] train ids of the sample's label map, checked against the vocabulary (dtype, id range)."""
        if sample.label is None:
            raise ValueError(f"no {self.info.label_member} member")
        label = decode_label_png(sample.label)
        check_label(label, self.vocab.label_dtype, self.vocab.num_classes, self.vocab.ignore_index,
                    self.info.label_member)
        return label

    def image_or_fail(self, sample: ExportSample, hw: tuple[int, int]) -> tuple[bytes, str]:
        """(bytes, "jpg" | "png") of the sample's image with the label's size; ValueError when there is none."""
        found = source_image(sample)
        if found is None:
            raise ValueError(f"no image: the shard stores none and json.source "
                             f"{sample.provenance.get('source')!r} is not a readable JPEG or PNG; re-run the source "
                             "stage with image_format=jpg or export to coco (which can reference sources)")
        check_image_size(found[0], hw)
        return found

    def write_meta(self, done: Sequence[ShardDone], files: Mapping[str, Any]) -> dict[str, Any]:
        """Write `segetl_export_<split>.json` (source, counts, vocabulary, label convention, files)."""
        vocab = self.vocab
        meta = {
            "format": self.name, "split": self.split, "num_samples": sum(d.count for d in done),
            "num_failed": sum(d.failed for d in done),
            "source": {"node": self.info.node, "fingerprint": self.info.fingerprint, "schema": self.info.schema,
                       "label_member": self.info.label_member},
            "label_dtype": np.dtype(vocab.label_dtype).name, "ignore_index": vocab.ignore_index,
            "num_classes": vocab.num_classes, "files": dict(files), "vocab": vocab.to_dict(),
        }
        self.target.write(f"segetl_export_{self.split}.json", json.dumps(meta, indent=1).encode())
        return {key: meta[key] for key in ("format", "split", "files")}


def check_label(label: np.ndarray, dtype: type, num_classes: int, ignore_index: int, member: str) -> None:
    """ValueError unless `label` is [H, W] of `dtype` with values in 0..num_classes-1 or `ignore_index`."""
    if label.dtype != dtype:
        raise ValueError(f"{member} is {label.dtype}, the vocabulary's label maps are {np.dtype(dtype).name}")
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        raise ValueError(f"{member} holds ids {bad[:5].tolist()} outside the vocabulary's {num_classes} classes")


def check_image_size(data: bytes, hw: tuple[int, int]) -> None:
    """ValueError unless the image's header says H x W = `hw` (pixels are not decoded)."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    if (height, width) != tuple(hw):
        raise ValueError(f"image is {height}x{width}, its label map {hw[0]}x{hw[1]} (HxW)")
