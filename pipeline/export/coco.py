"""COCO JSON: instance masks as RLE (from masks.json) and a stuff-style semantic variant (from the label maps).

Files for split S (see `pipeline.export`): `images/S/<key>.<ext>` (the image as stored; a sample without one
keeps its `json.source` as `file_name`), `annotations/instances_S.json`, `annotations/semantic_S.json` and, when
the samples carry ground truth, `annotations/ground_truth_S.json`. The three files share image ids (1, 2, ... in
source order) and categories, so `COCOeval` can score one against another.

* `categories`: one per vocabulary class: `id` (see `category_ids`), `name`, `supercategory` = the class's coarse
  group when the vocabulary has groups.
* instance annotations: `segmentation` (COCO compressed RLE, counts as str), `area`, `bbox` [x, y, w, h],
  `score`, `producer` (stage11 / stage12 / selftrain), `iscrowd` 0.
* semantic annotations: one region per class present in a label map, `score` 1.0, `producer` "label_map"
  (ground truth: "ground_truth"); regions never overlap, so rasterising them gives the label map back exactly.

The JSON files are streamed from the export's index shards, one sample at a time: memory stays bounded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import numpy as np

from pipeline.data.vocab import Vocabulary
from pipeline.export.formats import Converted, ExportFormat, check_image_size
from pipeline.export.source import ExportSample, source_image
from pipeline.sample_files import decode_label_png, mask_record, mask_to_rle
from pipeline.shards import ShardDone
from pipeline.tar_samples import iter_tar_samples

KINDS = ("instances", "semantic", "ground_truth")


def category_ids(vocab: Vocabulary, mode: str) -> list[int]:
    """COCO category id per train id: "source_ids", "train_id_plus_one", or "auto" (source ids when usable)."""
    usable = vocab.source_ids is not None and all(int(i) > 0 for i in vocab.source_ids) \
        and len(set(vocab.source_ids)) == vocab.num_classes
    if mode == "source_ids" and not usable:
        raise ValueError(f"category_ids=source_ids: vocabulary {vocab.name!r} has no usable source ids (positive, "
                         "distinct); use train_id_plus_one")
    if mode == "source_ids" or (mode == "auto" and usable):
        return [int(i) for i in vocab.source_ids]
    return list(range(1, vocab.num_classes + 1))


def categories(vocab: Vocabulary, ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO `categories`: id, name and, with coarse groups, supercategory."""
    entries = []
    for train_id, name in enumerate(vocab.names):
        entry: dict[str, Any] = {"id": ids[train_id], "name": name}
        if vocab.coarse is not None:
            entry["supercategory"] = vocab.coarse[train_id]
        entries.append(entry)
    return entries


def label_regions(label: np.ndarray, ignore_index: int, producer: str) -> list[dict[str, Any]]:
    """One masks.json-style entry (train id, RLE, area, bbox, score 1.0) per class present in `label`."""
    return [mask_record(mask_to_rle(label == c), int(c), 1.0, producer)
            for c in np.unique(label) if int(c) != ignore_index]


class CocoFormat(ExportFormat):
    """`--format coco`."""

    name = "coco"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ids = category_ids(self.vocab, self.category_ids)

    def convert(self, sample: ExportSample) -> Converted:
        label = self.label_array(sample)
        hw = (int(label.shape[0]), int(label.shape[1]))
        ignore = self.vocab.ignore_index
        files, file_name, image_ext = {}, str(sample.provenance.get("source", "")), None
        found = source_image(sample)
        if found is not None:
            data, image_ext = found
            check_image_size(data, hw)
            file_name = f"{sample.key}.{image_ext}"
            files[f"images/{self.split}/{file_name}"] = data
        record = {
            "image": {"file_name": file_name, "height": hw[0], "width": hw[1], "segetl_key": sample.key,
                      "source": str(sample.provenance.get("source", ""))},
            "image_ext": image_ext,
            "instances": [self._instance(entry, hw) for entry in sample.masks],
            "semantic": [self._coco(r) for r in label_regions(label, ignore, "label_map")],
        }
        if sample.gt is not None:
            gt = decode_label_png(sample.gt)
            if gt.shape != label.shape:
                raise ValueError(f"gt.png is {gt.shape}, the label map {label.shape}")
            record["ground_truth"] = [self._coco(r) for r in label_regions(gt, ignore, "ground_truth")]
        return Converted(sample.key, files, record)

    def _instance(self, entry: Mapping[str, Any], hw: tuple[int, int]) -> dict[str, Any]:
        size = [int(v) for v in entry["segmentation"]["size"]]
        if size != list(hw):
            raise ValueError(f"masks.json entry of size {size} on a {hw[0]}x{hw[1]} label map")
        if not 0 <= int(entry["category_id"]) < self.vocab.num_classes:
            raise ValueError(f"masks.json category_id {entry['category_id']} outside the vocabulary")
        return self._coco(entry)

    def _coco(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """A masks.json entry as a COCO annotation (train id -> category id; id and image_id added later)."""
        return {"category_id": self.ids[int(entry["category_id"])], "segmentation": dict(entry["segmentation"]),
                "area": int(entry["area"]), "bbox": list(entry["bbox"]), "iscrowd": 0,
                "score": float(entry["score"]), "producer": entry["producer"]}

    def write(self, converted: Converted) -> None:
        super().write(converted)
        if "ground_truth" in converted.record:
            self.counts["ground_truth"] += 1

    def finalize(self, index_urls: Sequence[str], done: Sequence[ShardDone]) -> dict[str, Any]:
        with_gt = sum(d.extra.get("ground_truth", 0) for d in done)
        files = {}
        for kind in KINDS:
            if kind == "ground_truth" and not with_gt:
                continue
            relative = f"annotations/{kind}_{self.split}.json"
            with self.target.open(relative) as handle:
                self._stream(handle, kind, index_urls)
            files[kind] = relative
        return self.write_meta(done, files)

    def _stream(self, handle: IO[bytes], kind: str, index_urls: Sequence[str]) -> None:
        """Write one COCO file: header, images (two passes over the index shards), annotations."""
        info = {"description": f"segetl export of {self.info.node} ({kind})", "version": self.info.fingerprint,
                "split": self.split}
        head = json.dumps({"info": info, "licenses": [], "categories": categories(self.vocab, self.ids)})
        handle.write(head[:-1].encode() + b', "images": [')
        _write_items(handle, ({"id": image_id, **record["image"]} for image_id, record in _records(index_urls)
                              if kind != "ground_truth" or "ground_truth" in record))
        handle.write(b'], "annotations": [')
        annotations = ({"id": 0, "image_id": image_id, **ann} for image_id, record in _records(index_urls)
                       for ann in record.get(kind, []))
        _write_items(handle, ({**ann, "id": ann_id} for ann_id, ann in enumerate(annotations, start=1)))
        handle.write(b"]}")


def _records(index_urls: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(image id from 1, index record) of every exported sample, in source order."""
    image_id = 0
    for url in index_urls:
        for sample in iter_tar_samples(url):
            image_id += 1
            yield image_id, json.loads(sample["json"])


def _write_items(handle: IO[bytes], items: Iterator[dict[str, Any]]) -> None:
    for position, item in enumerate(items):
        handle.write((b"," if position else b"") + json.dumps(item).encode())
