"""Hugging Face Parquet: `data/S-NNNNN-of-MMMMM.parquet` (one file per source shard) + `id2label.json`, `label2id.json`.

Columns: `key` (string), `image` and `label` as `{"bytes", "path"}` structs with `datasets.Image` features declared
in the schema metadata (the `huggingface` key `datasets` itself writes), so
`datasets.load_dataset("parquet", data_files="DIR/data/S-*.parquet")` gives PIL images; `label` decodes to mode L
(uint8, 255 = ignore) or I;16 (uint16, 65535 = ignore). `id2label` / `label2id` are what `transformers`
segmentation configs take (`id2label` keys are strings of the train ids). Rows are written in row groups of
`ROW_GROUP` samples while a shard is read, so memory stays bounded; a file appears only when its shard is done.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.export.formats import Converted, ExportFormat
from pipeline.export.source import ExportSample
from pipeline.shards import ShardDone

ROW_GROUP = 64
_FILE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FEATURES = {"key": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}, "label": {"_type": "Image"}}
SCHEMA = pa.schema([("key", pa.string()), ("image", _FILE), ("label", _FILE)],
                   metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})


class HfFormat(ExportFormat):
    """`--format hf`."""

    name = "hf"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rows: list[dict[str, Any]] = []
        self._files = ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def begin_shard(self, index: int, total: int) -> None:
        """Start a shard; a file left open by a shard that failed is discarded, never published."""
        if self._writer is not None:
            aborted = RuntimeError("previous shard failed")
            self._files.__exit__(type(aborted), aborted, None)
        self._rows, self._files, self._writer = [], ExitStack(), None
        super().begin_shard(index, total)

    def shard_file(self, index: int, total: int) -> str:
        """The Parquet file of source shard `index` of `total`."""
        return f"data/{self.split}-{index:05d}-of-{total:05d}.parquet"

    def convert(self, sample: ExportSample) -> Converted:
        label = self.label_array(sample)
        data, ext = self.image_or_fail(sample, (int(label.shape[0]), int(label.shape[1])))
        row = {"key": sample.key, "image": {"bytes": data, "path": f"{sample.key}.{ext}"},
               "label": {"bytes": sample.label, "path": f"{sample.key}.png"}}
        return Converted(sample.key, {}, {"file": self.shard_file(self.shard_index, self.num_shards),
                                          "image_ext": ext}, row)

    def write(self, converted: Converted) -> None:
        super().write(converted)
        self._rows.append(converted.row)
        if len(self._rows) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self._writer is None:
            handle = self._files.enter_context(self.target.open(self.shard_file(self.shard_index, self.num_shards)))
            self._writer = self._files.enter_context(pq.ParquetWriter(handle, SCHEMA))
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=SCHEMA))
        self._rows = []

    def end_shard(self) -> dict[str, Any]:
        """Write the last row group and publish the shard's file (also when it has no rows)."""
        self._flush()
        self._files.close()
        self._writer = None
        return super().end_shard()

    def finalize(self, index_urls: Sequence[str], done: Sequence[ShardDone]) -> dict[str, Any]:
        names = self.vocab.names
        self.target.write("id2label.json", json.dumps({str(i): n for i, n in enumerate(names)}, indent=1).encode())
        self.target.write("label2id.json", json.dumps({n: i for i, n in enumerate(names)}, indent=1).encode())
        return self.write_meta(done, {"data_files": f"data/{self.split}-*.parquet", "id2label": "id2label.json",
                                      "label2id": "label2id.json"})
