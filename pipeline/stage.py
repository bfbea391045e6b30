"""The contract between a stage and the executors. Stages know nothing about Ray.

Lifecycle of one stage run (driver, then workers):

    driver:  stage = Kind(context); stage.identities(); plans = stage.plan()
    worker:  stage.setup()                                  once per task (CPU) or per actor (model stages)
             for each batch of stage.iter_loaded(plan):     prefetched in a thread: decoding overlaps compute
                 outputs = stage.process_batch(loaded)      one SampleOutput per item, failures included;
                                                             must not touch per-shard counters
                 stage.fold(outputs)                        called by the executor only after the batch (or, after
                                                             a failed batch, each item alone) succeeded

    driver:  extra = stage.finalize(done_markers)            aggregate (e.g. metrics), write stage-level files

`stage.end_shard()` is called after each shard; what it returns is stored in that shard's done-marker
(`extra`), so per-shard aggregates (partial confusion matrices, counters) survive a crash with the shard.
Per-item statistics travel in `SampleOutput.stats` (in memory only, never written) and enter those aggregates
through `fold`, which the executor calls once per successful item: a batch that raises and is re-run item by
item is never counted twice, and no stage needs a guard of its own.

Unsharded stages (`sharded = False`, e.g. the Ray Train trainer) implement `run_unsharded()` instead of
`plan`/`process_batch`; the runner calls it on the driver, and it must resume by itself after a crash.

A stage's knobs are the fields of its `Config` dataclass; the node's YAML mirrors them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.config import build_config
from pipeline.shards import SampleOutput, ShardDone, StageOutput


@dataclass(frozen=True)
class ShardPlan:
    """One unit of work: shard `index` and its per-sample inputs (picklable, cheap: indices, refs, URLs)."""

    index: int
    items: tuple[Any, ...]


@dataclass
class Resources:
    """Where and how fast a node runs; never part of its fingerprint.

    Attributes:
        num_cpus: CPUs per task or actor (fractional allowed: Ray on 2 cores starves with whole CPUs per actor).
        num_gpus: GPUs per actor; > 0 makes the executor use an actor pool.
        pool_size: actors in the pool for model stages (fixed size).
        batch_size: items per `process_batch` call.
        max_retries: Ray retries of a failed shard task (worker crash, node loss).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    pool_size: int = 1
    batch_size: int = 64
    max_retries: int = 3


@dataclass
class StageContext:
    """Everything a stage instance needs; built on the driver and shipped (pickled) to workers.

    Attributes:
        node: node name in the DAG (the top-level config key, e.g. "wordgrid").
        seed: the run seed; random streams derive from (seed, node, shard index[, sample index]).
        config: the node's resolved config as plain data (no file paths to config files).
        upstream: input port -> the upstream stage output it reads.
        output_url: the fingerprint directory this run writes into.
        fingerprint: this node's fingerprint (the last component of `output_url`).
        executor: the run's executor ("ray" or "local"); "local" means no Ray anywhere, training included.
    """

    node: str
    seed: int
    config: dict[str, Any]
    upstream: dict[str, StageOutput] = field(default_factory=dict)
    output_url: str = ""
    fingerprint: str = ""
    executor: str = "ray"


class Stage:
    """Base class of the stage kinds; subclasses live in `stages/`."""

    kind: ClassVar[str] = ""
    code_version: ClassVar[str] = "1"
    schema: ClassVar[str] = ""
    input_ports: ClassVar[tuple[str, ...]] = ()
    uses_models: ClassVar[bool] = False
    sharded: ClassVar[bool] = True
    Config: ClassVar[type] = object

    def __init__(self, context: StageContext) -> None:
        self.context = context
        self.cfg = build_config(self.Config, context.config, context.node)

    def identities(self) -> dict[str, str]:
        """Identities of non-stage inputs (weights, vocabulary content) for the fingerprint; driver side."""
        return {}

    def plan(self) -> list[ShardPlan]:
        """Split the work into shards; driver side, cheap (no decoding, no models)."""
        raise NotImplementedError

    def setup(self) -> None:
        """Load models and other per-worker state."""

    def load(self, item: Any) -> Any:
        """Per-item CPU work that can run ahead of `process_batch` (decode); must not raise for bad data."""
        return item

    def iter_loaded(self, plan: ShardPlan) -> Iterator[Any]:
        """The shard's loaded items in order. Stages that stream an upstream shard override this."""
        for item in plan.items:
            yield self.load(item)

    def process_batch(self, loaded: Sequence[Any]) -> list[SampleOutput]:
        """Produce one SampleOutput per loaded item, failed ones included."""
        raise NotImplementedError

    def fold(self, outputs: Sequence[SampleOutput]) -> None:
        """Add the `stats` of outputs whose batch succeeded to the per-shard aggregates (see the module doc)."""

    def item_key(self, item: Any) -> str:
        """Sample key of an item, used to record a failed row when `process_batch` raises on it."""
        return str(item)

    def end_shard(self) -> dict[str, Any]:
        """JSON-safe per-shard aggregate stored in the shard's done-marker; reset whatever it reports."""
        return {}

    def finalize(self, done: list[ShardDone]) -> dict[str, Any]:
        """Driver side, after all shards: aggregate the done-markers' `extra`, write stage-level files.

        Returns extra manifest fields.
        """
        return {}

    def run_unsharded(self) -> dict[str, Any]:
        """The whole work of an unsharded stage, writing under `context.output_url`; returns manifest fields."""
        raise NotImplementedError

    def manifest_extra(self) -> dict[str, Any]:
        """Extra stage-level fields for manifest.json (e.g. the vocabulary)."""
        return {}


def shard_plans(items: Sequence[Any], per_shard: int) -> list[ShardPlan]:
    """Consecutive runs of `per_shard` items as shards 0, 1, ...; the one place work is cut into shards."""
    per_shard = max(1, int(per_shard))
    return [ShardPlan(index, tuple(items[start:start + per_shard]))
            for index, start in enumerate(range(0, len(items), per_shard))]
