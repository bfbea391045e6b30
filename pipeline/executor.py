"""Map a stage's shards over workers: one shared per-shard function, a local executor and a Ray executor.

`run_shard` is the only code that turns a ShardPlan into committed files; both executors call it.
The Ray executor runs CPU stages as retried tasks and model stages on a supervised actor pool
(`pipeline.actor_pool`) whose actors load the model once (`Stage.setup`). Ray's scheduling API lives in these two
modules; placement checks and Ray start-up in `pipeline.cluster`.

Failure policy, in one place (design contract 7):

- a worker or a whole node dies: Ray re-runs its task (`resources.max_retries`); the pool gives the dead actor's
  shard to another actor and starts a replacement where the cluster has room;
- a shard's code raises: it is retried (up to `max_retries` times), then it is a failed shard: the other shards
  still run, and the node ends with `ShardsFailed` (exit 1) naming each failed shard and its last error; the
  rerun redoes only those (their done-markers are missing);
- a task or actor that no node of the cluster can host: `PlacementError` before anything is queued (exit 2);
- no shard finished for `stall_timeout_s`: a warning naming the pending shards and where they wait.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from pipeline.cluster import check_placement, demand, fmt, here, where
from pipeline.config import ConfigError
from pipeline.progress import NodeRun, current
from pipeline.shard_run import error_reason, run_batch, run_shard  # noqa: F401 - run_batch: public here too
from pipeline.shards import ShardDone, shard_name
from pipeline.stage import Resources, ShardPlan, Stage, StageContext
from pipeline.threads import pinned_torch_threads

OnDone = Callable[[ShardDone], None]


class ShardsFailed(RuntimeError):
    """Some shards failed after all their retries; the others are committed and a rerun redoes only these."""

    def __init__(self, node: str, failures: dict[int, str], total: int) -> None:
        self.node, self.failures = node, dict(sorted(failures.items()))
        listed = "; ".join(f"shard {shard_name(i)}: {reason}" for i, reason in list(self.failures.items())[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"{node}: {len(failures)} of {total} shards failed after all retries and are not "
                         f"committed; the others are, and a rerun redoes only the failed ones: {listed}{more}")


class LocalExecutor:
    """Runs shards sequentially in this process: tests, debugging, and stages too small for Ray.

    No retries here: an exception in a shard propagates with its traceback (that is what debugging wants).
    """

    def run(self, stage_cls: type[Stage], context: StageContext, plans: list[ShardPlan], resources: Resources,
            on_done: OnDone) -> None:
        node_run = current(context.node)
        node_run.begin(len(plans))
        stage = stage_cls(context)  # in the driver: `pipeline.run.run_node` pinned resources.torch_threads
        stage.setup()
        driver = here()
        for plan in plans:
            node_run.check_abort()
            done = run_shard(stage, plan, resources.batch_size)
            on_done(done)
            node_run.shard_done(done, driver)


class RayExecutor:
    """Runs shards on a Ray cluster: retried tasks for CPU stages, a supervised actor pool for model stages."""

    def run(self, stage_cls: type[Stage], context: StageContext, plans: list[ShardPlan], resources: Resources,
            on_done: OnDone) -> None:
        from pipeline.actor_pool import ActorPool

        node_run = current(context.node)
        node_run.begin(len(plans))

        def finished(done: ShardDone, where: dict[str, Any]) -> None:
            on_done(done)
            node_run.shard_done(done, where)

        if stage_cls.uses_models or resources.num_gpus > 0:
            failures = ActorPool(stage_cls, context, resources, node_run).run(plans, finished)
        else:
            failures = _task_map(stage_cls, context, plans, resources, node_run, finished)
        if failures:
            raise ShardsFailed(context.node, failures, len(plans))


def _run_shard_task(stage_cls: type[Stage], context: StageContext, plan: ShardPlan, batch_size: int,
                    torch_threads: int = 0) -> tuple[ShardDone, dict[str, Any]]:
    with pinned_torch_threads(torch_threads):
        stage = stage_cls(context)
        stage.setup()
        return run_shard(stage, plan, batch_size), where()


def _task_map(stage_cls: type[Stage], context: StageContext, plans: list[ShardPlan], resources: Resources,
              node_run: NodeRun, finished: Callable[[ShardDone, dict[str, Any]], None]) -> dict[int, str]:
    """Run each shard as a Ray task (retried on worker or node loss and on exceptions); return the failed ones.

    At most twice as many tasks as the cluster can run at once are queued in Ray; the rest wait on the driver,
    so a plan of any size costs Ray only a window of task specs.
    """
    import ray

    wanted = demand(resources.num_cpus, custom=resources.custom_resources)
    fits = check_placement(context.node, "each task", wanted, len(plans),
                           f"{context.node}.resources.num_cpus / custom_resources")
    remote = ray.remote(_run_shard_task).options(num_cpus=resources.num_cpus, max_retries=resources.max_retries,
                                                 resources=resources.custom_resources or None, retry_exceptions=True)
    context_ref = ray.put(context)
    queue, pending, failures = deque(plans), {}, {}

    def waiting() -> str:
        names = ", ".join(shard_name(p.index) for p in list(pending.values())[:8])
        return (f"{len(pending)} task(s) submitted to Ray (shards {names}{', ...' if len(pending) > 8 else ''}) "
                f"and {len(queue)} queued on the driver; each asks for {fmt(wanted)}, free now: "
                f"{fmt({k: v for k, v in ray.available_resources().items() if k in ('CPU', 'GPU')})}")

    try:
        while queue or pending:
            node_run.check_abort()
            while queue and len(pending) < max(2, 2 * fits):
                plan = queue.popleft()
                ref = remote.remote(stage_cls, context_ref, plan, resources.batch_size, resources.torch_threads)
                pending[ref] = plan
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if ready:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in ready:
                plan = pending.pop(ref)
                try:
                    done, where_ran = ray.get(ref)
                except ray.exceptions.RayError as error:
                    failures[plan.index] = error_reason(error)
                    node_run.note(f"shard {shard_name(plan.index)} failed after {resources.max_retries} retries: "
                                  f"{failures[plan.index]}")
                else:
                    finished(done, where_ran)
            node_run.check_stall(waiting)
    finally:
        for ref in pending:
            ray.cancel(ref)
    return failures


def make_executor(kind: str) -> LocalExecutor | RayExecutor:
    """`executor=ray` (default) or `executor=local`."""
    executors = {"ray": RayExecutor, "local": LocalExecutor}
    if kind not in executors:
        raise ConfigError(f"executor={kind!r}: choose one of {sorted(executors)}")
    return executors[kind]()
