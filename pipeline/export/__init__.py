"""Hand-over: a stage output's labels in the layouts other tools read (design contract 8).

    python -m pipeline.export SRC --format {coco,mmseg,hf} --out DIR [--split NAME] [--method NAME]

SRC is a `pseudolabel/1` output (pseudolabel, selftrain) or an `eval/1` output (one method's predictions), a path
or fsspec URL (a node directory follows `current.json`). The same work runs as the DAG stage kind `export`
(`stages/export.py`): one shard of work per source shard, on the run's executor (Ray tasks by default), resumed by
done-markers, skipped when its source is unchanged. Layouts under the export folder, for split S:

    coco    images/S/<key>.<jpg|png>
            annotations/instances_S.json      masks.json instances: RLE, area, bbox, score, producer
            annotations/semantic_S.json       one RLE region per class of each label map (stuff-style)
            annotations/ground_truth_S.json   the same from gt.png, when the samples carry ground truth
    mmseg   img_dir/S/<key>.<jpg|png>, ann_dir/S/<key>.png (the label PNG as stored: uint8 with 255 = ignore,
            uint16 with 65535 above 255 classes), mmseg_S.py (dataset config snippet, reduce_zero_label = False)
    hf      data/S-NNNNN-of-MMMMM.parquet (columns key, image, label; `datasets` Image features in the schema
            metadata), id2label.json, label2id.json
    all     segetl_export_S.json: source node and fingerprint, format, counts, vocabulary, ignore index, dtype

Sample keys become file names only after `pipeline.export.source` validated them; every path is checked to stay
inside the export folder by `pipeline.export.writer.ExportTarget`.
"""

from __future__ import annotations

import importlib

# format -> "module:Class"; imported lazily (hf needs pyarrow only, coco pycocotools only).
FORMATS: dict[str, str] = {
    "coco": "pipeline.export.coco:CocoFormat",
    "mmseg": "pipeline.export.mmseg:MmsegFormat",
    "hf": "pipeline.export.hf:HfFormat",
}


def format_class(name: str) -> type:
    """The `pipeline.export.formats.ExportFormat` subclass registered for `name`."""
    if name not in FORMATS:
        raise ValueError(f"unknown export format {name!r}; formats: {sorted(FORMATS)}")
    module_name, class_name = FORMATS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
