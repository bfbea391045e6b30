"""The contract between a stage and the executors. Stages know nothing about Ray.

Lifecycle of one stage run (driver, then workers):

    driver:  stage = Kind(context); stage.identities(); stage.input_identity(); plans = stage.plan()
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

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.config import ConfigError, build_config, checked_adapter
from pipeline.shards import SampleOutput, ShardDone, StageOutput

if TYPE_CHECKING:
    from pipeline.data.records import InputIdentity


LOCATION_KEYS = ("root", "annotation_file", "urls", "image_root")
"""The `data:` keys that say where an adapter's files are, named first when they are missing."""


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
        custom_resources: Ray custom resources per task or actor, e.g. {"accelerator_a100": 1} (what a node
            declares with `ray start --resources`); checked against the cluster like CPUs and GPUs.
        torch_threads: torch intra-op threads while the node's shards run, in the driver or a Ray worker
            (0: leave torch's setting); set it to make float results independent of the caller's thread state.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    pool_size: int = 1
    batch_size: int = 64
    max_retries: int = 3
    custom_resources: dict[str, float] = field(default_factory=dict)
    torch_threads: int = 0


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
        forced: this run was asked for with `force=[node]`: the stage starts from scratch and ignores partial state
            it would otherwise resume from (a trainer's checkpoints).
    """

    node: str
    seed: int
    config: dict[str, Any]
    upstream: dict[str, StageOutput] = field(default_factory=dict)
    output_url: str = ""
    fingerprint: str = ""
    executor: str = "ray"
    forced: bool = False


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

    def input_identity(self) -> InputIdentity | None:
        """The listing identity of the node's input adapter (its `data:` mapping) for the fingerprint; driver side.

        One listing per folder, never image bytes (the adapters' `input_identity`). None for stages without a
        `data:` adapter (their inputs are their config, seed and upstream outputs). Uses the stage's `adapter`
        attribute when it has built one, else builds it with the stage's `vocab`.

        Raises:
            ConfigError: The data is missing (no such folder, no matching file), naming `<node>.data.<key>`.
        """
        data = self.context.config.get("data")
        if not isinstance(data, Mapping) or not data:
            return None
        node = self.context.node
        adapter = getattr(self, "adapter", None) or checked_adapter(data, getattr(self, "vocab", None), node)
        try:
            return adapter.input_identity()
        except (OSError, ValueError) as error:
            where = next((f"{node}.data.{key}={data[key]!r}" for key in LOCATION_KEYS if data.get(key)), f"{node}.data")
            raise ConfigError(f"{where}: {error}; point it at the data (it must exist before the run)") from None

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


CDC_MIN_SHARDS = 4
"""Keyed inputs shorter than this many shards are cut into equal runs (as small inputs always were); longer ones by
content, so that inserting or deleting one item rewrites O(1) shards instead of every shard after it."""


def shard_plans(items: Sequence[Any], per_shard: int) -> list[ShardPlan]:
    """Cut `items` (in their given, sorted order) into shards 0, 1, ...; the one place work is cut into shards.

    Items with a sample key (`ItemRef`s, or tuples whose first element is one) of at least `CDC_MIN_SHARDS`
    shards' worth get content-defined boundaries (`content_defined_cuts`): a shard's membership depends only on
    its own keys and its neighbours', so a from-scratch run and an incremental run over the same items cut the same
    shards and an insertion or deletion changes one or two of them. Anything else (wordgrid's sample indices,
    small inputs) is cut into consecutive runs of `per_shard`, which appending never disturbs.

    Shard names are their index in key order (`pipeline.shards.shard_name`): deterministic from the inputs. An
    insertion that splits a shard renumbers the shards after it; their contents, and so their bytes, stay the same.
    """
    per_shard = max(1, int(per_shard))
    keys = [_sample_key(item) for item in items]
    if len(keys) >= CDC_MIN_SHARDS * per_shard and all(key is not None for key in keys):
        ends = content_defined_cuts(keys, per_shard)
    else:
        ends = list(range(per_shard, len(keys), per_shard)) + ([len(keys)] if len(keys) else [])
    starts = [0, *ends[:-1]]
    return [ShardPlan(index, tuple(items[start:end])) for index, (start, end) in enumerate(zip(starts, ends))]


def content_defined_cuts(keys: Sequence[str], per_shard: int) -> list[int]:
    """End offsets of content-defined shards over sorted `keys`: a shard ends after a key whose hash hits
    1 / (per_shard - min + 1), once it holds at least min = per_shard // 4 keys, or when it reaches 4 * per_shard;
    mean size ≈ per_shard. Returns the exclusive end index of every shard, the last one being len(keys)."""
    minimum, maximum = max(1, per_shard // 4), 4 * per_shard
    rate = per_shard - minimum + 1
    ends, size = [], 0
    for offset, key in enumerate(keys, start=1):
        size += 1
        hit = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % rate == 0
        if (size >= minimum and hit) or size >= maximum:
            ends.append(offset)
            size = 0
    if size:
        ends.append(len(keys))
    return ends


def _sample_key(item: Any) -> str | None:
    """The sample key of a plan item (`.key`, or the `.key` of a tuple's first element); None for indices."""
    key = getattr(item, "key", None)
    if key is None and isinstance(item, tuple) and item:
        key = getattr(item[0], "key", None)
    return key if isinstance(key, str) else None
