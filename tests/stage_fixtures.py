"""Test-only stage kinds: a descendant of wordgrid, and a stage whose samples fail on demand."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pipeline.shards import SampleOutput
from pipeline.stage import Resources, ShardPlan, Stage


@dataclass
class GridStatsConfig:
    fail_every: int = 0  # every n-th sample raises (0 = never)
    resources: Resources = field(default_factory=Resources)


class GridStatsStage(Stage):
    """One sample per upstream grid: its shape and class histogram size. Reads port `grids`."""

    kind = "gridstats"
    schema = "gridstats/1"
    input_ports = ("grids",)
    Config = GridStatsConfig

    def plan(self) -> list[ShardPlan]:
        return [ShardPlan(i, (url,)) for i, url in enumerate(self.context.upstream["grids"].shard_urls())]

    def iter_loaded(self, plan: ShardPlan) -> Iterator[dict]:
        return self.context.upstream["grids"].samples(list(plan.items))

    def process_batch(self, loaded: Sequence[dict]) -> list[SampleOutput]:
        return [self._stats(sample) for sample in loaded]

    def _stats(self, sample: dict) -> SampleOutput:
        meta = json.loads(sample["json"])
        if self.cfg.fail_every and meta["index"] % self.cfg.fail_every == 0:
            return SampleOutput(key=sample["__key__"], files=None, error="injected failure")
        body = json.dumps({"height": meta["height"], "width": meta["width"]}).encode()
        return SampleOutput(key=sample["__key__"], files={"json": body})

