"""Run the selected nodes of the DAG concurrently: each starts the moment its last upstream has committed.

Every node runs in a driver thread of its own (`run_dag`), which asks Ray for that node's declared resources
(tasks, an actor pool or a Ray Train trainer); Ray places them across the cluster, so independent branches
(`wordgrid` || `pseudolabel`, the trainers, ...) share the cluster instead of queueing behind each other. Outputs
do not depend on the order of completion: each node's bytes are a function of its config and upstream manifests.

Failures: a node that fails on its data (`contained` errors: failure ratio exceeded, shards failed after all
retries) stops only its descendants; independent branches finish, then the first error is raised. Any other
error (bad config, a request the cluster cannot place, Ray unreachable, a bug) aborts the run: no node starts
any more, and running executors stop at their next check (`NodeRun.abort`); committed shards stay.

Nodes whose work runs inside the driver process (`executor=local`, a trainer with `resources.backend=local`)
run alone: they share the process' global state (torch's random seed, threads).

Streaming (a sharded consumer reading its producer's committed shards before the producer ends) fits here
later: a node would start on its upstream's first committed shard instead of its manifest, and its plan grow
as markers appear. Today a node starts when its upstream manifests exist.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pipeline.config import ConfigError, at_least, build_config

log = logging.getLogger("pipeline.scheduler")
T = TypeVar("T")


@dataclass
class RunOptions:
    """Run-wide scheduling and progress knobs (top-level keys of conf/base.yaml).

    Attributes:
        max_concurrent_nodes: nodes running at once; null = no limit but the cluster's resources
            (`executor=local` always runs one node at a time).
        stall_timeout_s: a node with no finished shard for this long logs which shards are pending and where.
        progress: auto (bar on a terminal, else lines) | bar | lines | off.
        progress_interval_s: seconds between progress lines in `lines` mode.
    """

    max_concurrent_nodes: int | None = None
    stall_timeout_s: float = 300.0
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    progress_interval_s: float = 10.0


def run_options(cfg: Mapping[str, Any]) -> RunOptions:
    """The run options of a resolved config; ConfigError naming the key on a bad value."""
    keys = RunOptions.__dataclass_fields__
    try:
        options = build_config(RunOptions, {k: cfg[k] for k in keys if cfg.get(k) is not None}, "run")
    except ConfigError as error:
        raise ConfigError(str(error).removeprefix("run.")) from None
    at_least("max_concurrent_nodes", options.max_concurrent_nodes, 1)
    at_least("stall_timeout_s", options.stall_timeout_s, 1)
    at_least("progress_interval_s", options.progress_interval_s, 0.1)
    return options


def runs_in_driver(config: Mapping[str, Any], executor: str) -> bool:
    """Whether a node's work runs inside the driver process (then it must run alone)."""
    return executor == "local" or (config.get("resources") or {}).get("backend") == "local"


def run_dag(order: Sequence[str], upstream: Mapping[str, Collection[str]],
            run_one: Callable[[str, threading.Event], T], max_concurrent: int | None = None,
            exclusive: Callable[[str], bool] = lambda name: False,
            contained: tuple[type[BaseException], ...] = ()) -> dict[str, T]:
    """Run `run_one(name, abort)` for every node of `order`, each once its upstreams (those in `order`) succeeded.

    Args:
        order: the nodes to run, upstream first (ties start in this order).
        upstream: node -> the nodes it reads; upstreams outside `order` count as committed already.
        run_one: runs one node in a thread of its own; `abort` is set when the run is being aborted.
        max_concurrent: nodes running at once (None = all that are ready).
        exclusive: nodes that must run with no other node running.
        contained: errors that stop only the failing node's descendants (others abort the run).

    Returns:
        node -> what `run_one` returned, when every node succeeded; else raises the first error.
    """
    selected = set(order)
    needs = {name: {up for up in upstream.get(name, ()) if up in selected} for name in order}
    waiting, running = list(order), {}
    results: dict[str, T] = {}
    failed: set[str] = set()
    errors: list[BaseException] = []
    abort = threading.Event()
    limit = max_concurrent or max(1, len(order))
    with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="node") as pool:
        while waiting or running:
            if abort.is_set():
                waiting.clear()
            for name in list(waiting):
                if needs[name] & failed:
                    waiting.remove(name)
                    failed.add(name)
                    log.error("%s: not run, because %s failed", name, ", ".join(sorted(needs[name] & failed)))
                elif needs[name] <= results.keys() and _may_start(name, running, limit, exclusive):
                    waiting.remove(name)
                    running[pool.submit(run_one, name, abort)] = name
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                _collect(name, future, results, failed, errors, abort, contained, others=bool(running or waiting))
    fatal = [error for error in errors if not isinstance(error, contained)]
    if errors:
        raise (fatal or errors)[0]
    return results


def _may_start(name: str, running: Mapping[Future, str], limit: int, exclusive: Callable[[str], bool]) -> bool:
    if len(running) >= limit:
        return False
    if exclusive(name):
        return not running
    return not any(exclusive(other) for other in running.values())


def _collect(name: str, future: Future, results: dict[str, Any], failed: set[str], errors: list[BaseException],
             abort: threading.Event, contained: tuple[type[BaseException], ...], others: bool) -> None:
    """Record a finished node; an error is logged at once when other nodes go on (else the caller reports it)."""
    try:
        results[name] = future.result()
    except BaseException as error:  # noqa: BLE001 - recorded, re-raised by run_dag once the others stopped
        failed.add(name)
        if not abort.is_set() or not errors:
            errors.append(error)
        if not isinstance(error, contained):
            abort.set()
        if others:
            log.error("%s failed: %s", name, error)
