"""MMSegmentation / Detectron2 / FiftyOne folders: `img_dir/S/<key>.<ext>` + `ann_dir/S/<key>.png`.

The label PNG is copied byte for byte as the source stored it: uint8 (mode L) with 255 = ignore, or uint16
(mode I;16) with 65535 = ignore when the vocabulary has more than 255 classes. Train ids start at 0, so
`reduce_zero_label` is False. `mmseg_S.py` is a dataset config snippet (MMSegmentation 1.x `BaseSegDataset`)
with the classes, a palette, the suffixes and the ignore index; loaders for the same folders:

    Detectron2: load_sem_seg("DIR/ann_dir/S", "DIR/img_dir/S", gt_ext="png", image_ext="jpg"), ignore_label 255
    FiftyOne:   fo.Dataset.from_dir(dataset_type=fo.types.ImageSegmentationDirectory,
                                    data_path="DIR/img_dir/S", labels_path="DIR/ann_dir/S")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.export.formats import Converted, ExportFormat
from pipeline.export.source import ExportSample
from pipeline.report import make_palette
from pipeline.shards import ShardDone


class MmsegFormat(ExportFormat):
    """`--format mmseg`."""

    name = "mmseg"

    def convert(self, sample: ExportSample) -> Converted:
        label = self.label_array(sample)
        data, ext = self.image_or_fail(sample, (int(label.shape[0]), int(label.shape[1])))
        image_path, label_path = f"img_dir/{self.split}/{sample.key}.{ext}", f"ann_dir/{self.split}/{sample.key}.png"
        return Converted(sample.key, {image_path: data, label_path: sample.label},
                         {"image": image_path, "label": label_path, "image_ext": ext})

    def finalize(self, index_urls: Sequence[str], done: Sequence[ShardDone]) -> dict[str, Any]:
        exts = sorted({key.split(":", 1)[1] for d in done for key in d.extra if key.startswith("image_ext:")})
        if len(exts) > 1:
            raise ValueError(f"mmseg export of split {self.split!r} mixes image suffixes {exts}; MMSeg datasets take "
                             "one img_suffix")
        relative = f"mmseg_{self.split}.py"
        self.target.write(relative, self.config_snippet(exts[0] if exts else "jpg").encode())
        return self.write_meta(done, {"img_dir": f"img_dir/{self.split}", "ann_dir": f"ann_dir/{self.split}",
                                      "config": relative, "reduce_zero_label": False})

    def config_snippet(self, image_ext: str) -> str:
        """MMSegmentation 1.x config text defining `<split>_dataset` and `<split>_dataloader`."""
        split, var = self.split, self.split.replace("-", "_")
        palette = [list(map(int, rgb)) for rgb in make_palette(self.vocab.num_classes)]
        return "\n".join([
            f"# MMSegmentation 1.x dataset config: segetl export of {self.info.node} ({self.info.fingerprint}), "
            f"split {split!r}.",
            "# Use it as a _base_ file or copy what you need; label PNGs hold train ids starting at 0.",
            "dataset_type = 'BaseSegDataset'",
            f"data_root = {self.target.url!r}",
            f"metainfo = dict(classes={tuple(self.vocab.names)!r}, palette={palette!r})",
            "reduce_zero_label = False",
            f"ignore_index = {self.vocab.ignore_index}  # also the decode head's ignore_index",
            f"{var}_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', "
            "reduce_zero_label=reduce_zero_label), dict(type='PackSegInputs')]",
            f"{var}_dataset = dict(type=dataset_type, data_root=data_root, metainfo=metainfo, "
            f"data_prefix=dict(img_path='img_dir/{split}', seg_map_path='ann_dir/{split}'), "
            f"img_suffix='.{image_ext}', seg_map_suffix='.png', reduce_zero_label=reduce_zero_label, "
            f"ignore_index=ignore_index, pipeline={var}_pipeline)",
            f"{var}_dataloader = dict(batch_size=2, num_workers=2, persistent_workers=True, "
            f"sampler=dict(type='DefaultSampler', shuffle={split == 'train'}), dataset={var}_dataset)",
            "",
        ])
