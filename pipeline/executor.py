"""Map a stage's shards over workers: one shared per-shard function, a local executor and a Ray executor.

`run_shard` is the only code that turns a ShardPlan into committed files; both executors call it.
The Ray executor runs CPU stages as retried tasks and model stages as a fixed-size actor pool whose actors
load the model once (`Stage.setup`). All of Ray's scheduling API lives in this module.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
from tqdm import tqdm

from pipeline.config import ConfigError
from pipeline.shards import SampleOutput, ShardDone, commit_shard
from pipeline.stage import Resources, ShardPlan, Stage, StageContext

log = logging.getLogger(__name__)

OnDone = Callable[[ShardDone], None]


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= max(1, size):
            yield batch
            batch = []
    if batch:
        yield batch


def run_batch(stage: Stage, loaded: Sequence[Any]) -> list[SampleOutput]:
    """Run a batch and fold its statistics; if it raises, run its items one by one so one bad item fails alone.

    `Stage.fold` sees each item exactly once, and only from a call that succeeded: the per-shard aggregates of
    every stage are exact whatever fails, without a guard in the stage.
    """
    try:
        outputs = stage.process_batch(loaded)
        if len(outputs) != len(loaded):
            raise RuntimeError(f"{stage.kind}.process_batch returned {len(outputs)} outputs for {len(loaded)} items")
    except Exception:  # noqa: BLE001 - isolation below records every error per item
        if len(loaded) == 1:
            error = traceback.format_exc(limit=3).strip().splitlines()[-1]
            return [SampleOutput(key=stage.item_key(loaded[0]), files=None, error=error)]
        return [out for item in loaded for out in run_batch(stage, [item])]
    stage.fold(outputs)
    return outputs


def run_shard(stage: Stage, plan: ShardPlan, batch_size: int) -> ShardDone:
    """Process one shard and commit it (tar, sidecar, done-marker). Loading of batch i+1 overlaps batch i."""
    started = time.perf_counter()
    outputs: list[SampleOutput] = []
    batches = _batches(stage.iter_loaded(plan), batch_size)
    with ThreadPoolExecutor(max_workers=1) as prefetcher:
        pending = prefetcher.submit(next, batches, None)
        while (loaded := pending.result()) is not None:
            pending = prefetcher.submit(next, batches, None)
            outputs.extend(run_batch(stage, loaded))
    fs, path = fsspec.core.url_to_fs(stage.context.output_url)
    return commit_shard(fs, path, plan.index, outputs, stage.context.fingerprint,
                        seconds=time.perf_counter() - started, extra=stage.end_shard())


def _collect(node: str, results: Iterator[ShardDone], total: int, on_done: OnDone) -> None:
    """Hand each finished shard's marker to `on_done` as it arrives, with a progress bar."""
    samples = 0
    with tqdm(total=total, desc=f"{node:>14}", unit="shard", dynamic_ncols=True, leave=False,
              postfix={"samples": 0}, mininterval=0.5) as bar:
        for done in results:
            on_done(done)
            samples += done.count
            bar.set_postfix(samples=samples)
            bar.update(1)


class LocalExecutor:
    """Runs shards sequentially in this process: tests, debugging, and stages too small for Ray."""

    def run(self, stage_cls: type[Stage], context: StageContext, plans: list[ShardPlan], resources: Resources,
            on_done: OnDone) -> None:
        stage = stage_cls(context)
        stage.setup()
        _collect(context.node, (run_shard(stage, plan, resources.batch_size) for plan in plans), len(plans), on_done)


class RayExecutor:
    """Runs shards on a Ray cluster: retried tasks for CPU stages, a fixed actor pool for model stages."""

    def run(self, stage_cls: type[Stage], context: StageContext, plans: list[ShardPlan], resources: Resources,
            on_done: OnDone) -> None:
        if stage_cls.uses_models or resources.num_gpus > 0:
            results = _actor_pool_map(stage_cls, context, plans, resources)
        else:
            results = _task_map(stage_cls, context, plans, resources)
        _collect(context.node, results, len(plans), on_done)


def _run_shard_task(stage_cls: type[Stage], context: StageContext, plan: ShardPlan, batch_size: int) -> ShardDone:
    stage = stage_cls(context)
    stage.setup()
    return run_shard(stage, plan, batch_size)


def _task_map(stage_cls: type[Stage], context: StageContext, plans: list[ShardPlan],
              resources: Resources) -> Iterator[ShardDone]:
    """Yield finished shard markers as tasks complete (each task retried on worker failure)."""
    import ray

    remote = ray.remote(_run_shard_task).options(num_cpus=resources.num_cpus, max_retries=resources.max_retries,
                                                 retry_exceptions=False)
    context_ref = ray.put(context)
    pending = [remote.remote(stage_cls, context_ref, plan, resources.batch_size) for plan in plans]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield from ray.get(ready)


class _ShardActor:
    """Holds one stage instance with its models loaded once; processes shards sent to it."""

    def __init__(self, stage_cls: type[Stage], context: StageContext) -> None:
        self.stage = stage_cls(context)
        self.stage.setup()

    def run(self, plan: ShardPlan, batch_size: int) -> ShardDone:
        return run_shard(self.stage, plan, batch_size)


def _actor_pool_map(stage_cls: type[Stage], context: StageContext, plans: list[ShardPlan],
                    resources: Resources) -> Iterator[ShardDone]:
    """Yield shard markers from a fixed pool of `pool_size` actors (the model loads once per actor)."""
    import ray
    from ray.util import ActorPool

    actor_cls = ray.remote(_ShardActor).options(
        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_restarts=resources.max_retries,
        max_task_retries=resources.max_retries,
    )
    actors = [actor_cls.remote(stage_cls, context) for _ in range(max(1, resources.pool_size))]
    pool = ActorPool(actors)
    yield from pool.map_unordered(lambda actor, plan: actor.run.remote(plan, resources.batch_size), plans)
    for actor in actors:
        ray.kill(actor)


def make_executor(kind: str) -> LocalExecutor | RayExecutor:
    """`executor=ray` (default) or `executor=local`."""
    executors = {"ray": RayExecutor, "local": LocalExecutor}
    if kind not in executors:
        raise ConfigError(f"executor={kind!r}: choose one of {sorted(executors)}")
    return executors[kind]()
