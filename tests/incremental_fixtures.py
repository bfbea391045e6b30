"""Test-only stage kinds for incremental re-runs: a cheap stage over any input adapter, and a descendant of it.

`ImageStatsStage` decodes each item with its adapter (real folder / COCO JSON / shards loading) and writes its
size and mean colour; its per-shard aggregate (`pixels`) checks that reused shards keep exact aggregates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import checked_adapter, checked_vocab
from pipeline.data.records import ImageRecord, ItemRef
from pipeline.shards import SampleOutput, ShardDone
from pipeline.stage import Resources, ShardPlan, Stage, StageContext, shard_plans

KINDS = {"imagestats": "incremental_fixtures:ImageStatsStage", "tally": "incremental_fixtures:TallyStage"}


@dataclass
class ImageStatsConfig:
    data: dict = field(default_factory=dict)
    vocab: str = "toy"
    samples_per_shard: int = 4
    resources: Resources = field(default_factory=Resources)


class ImageStatsStage(Stage):
    """One sample per input image: {"h", "w", "mean"}; shard aggregate: total pixels."""

    kind = "imagestats"
    schema = "imagestats/1"
    Config = ImageStatsConfig

    def __init__(self, context: StageContext) -> None:
        super().__init__(context)
        self.vocab = checked_vocab(self.cfg.vocab, f"{context.node}.vocab")
        self.adapter = checked_adapter(self.cfg.data, self.vocab, context.node)
        self.pixels = 0

    def plan(self) -> list[ShardPlan]:
        return shard_plans(self.adapter.list_items(), self.cfg.samples_per_shard)

    def load(self, item: ItemRef) -> ImageRecord:
        return self.adapter.load(item)

    def item_key(self, item: Any) -> str:
        return item.key

    def process_batch(self, loaded: Sequence[ImageRecord]) -> list[SampleOutput]:
        return [self._sample(record) for record in loaded]

    def _sample(self, record: ImageRecord) -> SampleOutput:
        if not record.ok:
            return SampleOutput(record.key, None, record.meta.get("source", ""), error=record.error)
        h, w = record.image.shape[:2]
        body = {"h": h, "w": w, "mean": [round(float(c), 3) for c in record.image.reshape(-1, 3).mean(0)]}
        return SampleOutput(record.key, {"json": json.dumps(body, sort_keys=True).encode()},
                            record.meta.get("source", ""), stats=h * w)

    def fold(self, outputs: Sequence[SampleOutput]) -> None:
        self.pixels += sum(output.stats or 0 for output in outputs)

    def end_shard(self) -> dict[str, Any]:
        pixels, self.pixels = self.pixels, 0
        return {"pixels": pixels}

    def finalize(self, done: list[ShardDone]) -> dict[str, Any]:
        return {"pixels": sum(d.extra["pixels"] for d in done)}


@dataclass
class TallyConfig:
    resources: Resources = field(default_factory=Resources)


class TallyStage(Stage):
    """One sample per upstream sample (its key); reads port `src`: a descendant of the node under test."""

    kind = "tally"
    schema = "tally/1"
    input_ports = ("src",)
    Config = TallyConfig

    def plan(self) -> list[ShardPlan]:
        return [ShardPlan(i, (url,)) for i, url in enumerate(self.context.upstream["src"].shard_urls())]

    def iter_loaded(self, plan: ShardPlan) -> Iterator[dict]:
        return self.context.upstream["src"].samples(list(plan.items))

    def process_batch(self, loaded: Sequence[dict]) -> list[SampleOutput]:
        return [SampleOutput(s["__key__"], {"txt": s["__key__"].encode()}) for s in loaded]
