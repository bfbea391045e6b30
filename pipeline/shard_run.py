"""Turn one ShardPlan into committed files: the per-shard function every executor and the actor pool call.

Loading of batch i+1 overlaps batch i (a prefetch thread); a batch that raises is re-run item by item so one bad
item fails alone; `Stage.fold` sees each item exactly once, only from a call that succeeded.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec

from pipeline.shards import SampleOutput, ShardDone, commit_shard
from pipeline.stage import ShardPlan, Stage


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


def error_reason(error: BaseException, limit: int = 300) -> str:
    """The last line of an error (a Ray error's text ends with the original exception), shortened."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."
