"""Export a stage output's labels to COCO, MMSeg/Detectron2 folders or Hugging Face Parquet (design contract 8).

The source is the node wired to port `labels` (`inputs: {labels: pseudolabel}`) or, without one, the stage output
at `source` (a path or URL; a node directory follows its `current.json`; the CLI `python -m pipeline.export` runs
this stage that way). One shard of work per source shard, so the export runs in parallel on the executor, resumes
from done-markers, and is skipped when its source did not change (the source's fingerprint is in this node's).

This node's own output directory holds, per shard, a small index tar (one `json` per exported sample: the COCO
entries or the paths written), the sidecar of ok/failed samples and the done-marker; the exported files go to
`out` (default: `<this node's output>/<format>/`). Layouts and safety rules: `pipeline.export`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from pipeline.config import ConfigError
from pipeline.data.images import ImageDecodeError
from pipeline.export import format_class
from pipeline.export.formats import ExportFormat
from pipeline.export.source import ExportSample, SourceInfo, describe_source, iter_export_samples
from pipeline.export.writer import ExportTarget
from pipeline.shards import SampleOutput, ShardDone, StageOutput, join, open_stage
from pipeline.stage import Resources, ShardPlan, Stage, StageContext, shard_plans
from pipeline.tar_samples import DEFAULT_MAX_MEMBER_BYTES, UnsafeShardError

SPLIT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class ExportConfig:
    """Knobs of an `export` node (conf/stage/export.yaml mirrors them).

    Attributes:
        source: stage output to export when the node has no `inputs.labels` (path or fsspec URL).
        format: "coco", "mmseg" or "hf".
        out: the export folder (absolute path or URL); None = `<this node's output>/<format>`.
        split: split name used in the exported file and folder names.
        method: eval sources only: the method whose predictions are exported (optional with one method).
        category_ids: coco: "auto" (vocabulary source ids when it has them, else train id + 1),
            "train_id_plus_one" or "source_ids".
        verify: check each source shard's sha256 against its manifest before reading it.
        max_member_bytes: largest accepted tar member of the source; a larger one refuses the shard.
    """

    source: str | None = None
    format: Literal["coco", "mmseg", "hf"] = "coco"
    out: str | None = None
    split: str = "train"
    method: str | None = None
    category_ids: Literal["auto", "train_id_plus_one", "source_ids"] = "auto"
    verify: bool = False
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    resources: Resources = field(default_factory=Resources)


class ExportStage(Stage):
    """The `export` stage kind."""

    kind = "export"
    code_version = "1"
    schema = "export/1"
    Config = ExportConfig

    def __init__(self, context: StageContext) -> None:
        super().__init__(context)
        if not SPLIT.match(self.cfg.split):
            raise ConfigError(f"{context.node}.split={self.cfg.split!r}: use 1-64 characters of [A-Za-z0-9_-]")
        if "labels" not in context.upstream and not self.cfg.source and "labels" not in (context.config.get("inputs")
                                                                                          or {}):
            raise ConfigError(f"{context.node}: set inputs.labels=<node> or source=<stage output path or URL>")

    @cached_property
    def source(self) -> StageOutput:
        """The stage output being exported."""
        if "labels" in self.context.upstream:
            return self.context.upstream["labels"]
        try:
            return open_stage(self.cfg.source)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"{self.context.node}.source={self.cfg.source!r}: {error}") from None

    @cached_property
    def info(self) -> SourceInfo:
        return describe_source(self.source, self.cfg.method, self.context.node)

    def identities(self) -> dict[str, str]:
        """The source's fingerprint when it is read through `source` (an upstream node enters by its own)."""
        if "labels" in (self.context.config.get("inputs") or {}):
            return {}
        self._format()  # fails here, on the driver, for a source the format cannot take
        return {"source": self.info.fingerprint}

    def out_url(self) -> str:
        return self.cfg.out or join(self.context.output_url, self.cfg.format)

    def _format(self) -> ExportFormat:
        try:
            return format_class(self.cfg.format)(ExportTarget(self.out_url()), self.cfg.split, self.info,
                                                 self.cfg.category_ids)
        except ValueError as error:
            raise ConfigError(f"{self.context.node}: {error}") from None

    def plan(self) -> list[ShardPlan]:
        self._format()
        total = len(self.info.shards)
        return shard_plans([(url, sha256, total) for url, sha256 in self.info.shards], 1)

    def setup(self) -> None:
        self.format = self._format()

    def iter_loaded(self, plan: ShardPlan) -> Iterator[ExportSample]:
        url, sha256, total = plan.items[0]
        self.format.begin_shard(plan.index, total)
        yield from iter_export_samples(url, self.info, self.cfg.max_member_bytes, sha256 if self.cfg.verify else None)

    def item_key(self, item: ExportSample) -> str:
        return item.key

    def process_batch(self, loaded: Sequence[ExportSample]) -> list[SampleOutput]:
        return [self._convert(sample) for sample in loaded]

    def _convert(self, sample: ExportSample) -> SampleOutput:
        try:
            converted = self.format.convert(sample)
        except (ValueError, ImageDecodeError, KeyError, TypeError) as error:
            return SampleOutput(sample.key, None, source=sample.source, error=f"{type(error).__name__}: {error}")
        return SampleOutput(sample.key, {"json": json.dumps(converted.record).encode()}, source=sample.source,
                            stats=converted)

    def fold(self, outputs: Sequence[SampleOutput]) -> None:
        for output in outputs:
            if output.stats is not None:
                self.format.write(output.stats)

    def end_shard(self) -> dict[str, Any]:
        return self.format.end_shard()

    def finalize(self, done: list[ShardDone]) -> dict[str, Any]:
        check_unique_across_shards(self.context.output_url, done)
        index_urls = [join(self.context.output_url, f"{d.shard}.tar") for d in done]
        files = self._format().finalize(index_urls, done)
        return {"export": {**files, "out": self.out_url(), "source": {"node": self.info.node, "fingerprint":
                           self.info.fingerprint, "schema": self.info.schema, "label_member": self.info.label_member}}}

    def manifest_extra(self) -> dict[str, Any]:
        return {"vocab": self.info.vocab.to_dict()}


def check_unique_across_shards(output_url: str, done: Sequence[ShardDone]) -> None:
    """`UnsafeShardError` when two source shards exported the same key (their files overwrote each other)."""
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(output_url)
    owner: dict[str, str] = {}
    for marker in done:
        with fs.open(join(path, f"{marker.shard}.parquet"), "rb") as handle:
            rows = pq.read_table(handle, columns=["key", "status"]).to_pylist()
        for key in (row["key"] for row in rows if row["status"] == "ok"):
            if key in owner:
                raise UnsafeShardError(f"source shards {owner[key]} and {marker.shard} both hold key {key!r} (after "
                                       "sanitising); their exported files collide, so the export is not published")
            owner[key] = marker.shard
