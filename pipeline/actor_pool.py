"""A supervised pool of stage actors: models load once per actor, a lost actor costs only its shard.

Ray's `ray.util.ActorPool` hands shards to actors that may never be placed and stops at the first dead one.
This pool keeps the rules of `pipeline.executor`'s failure policy itself:

- it starts `pool_size` actors, or as many as the cluster's nodes can hold at once (with a warning), spread over
  the nodes, and gives shards only to actors whose `ready()` came back (model loaded), one shard per actor at a
  time;
- an actor that dies (its process, or its whole node) puts its shard back at the head of the queue, and a
  replacement starts while the cluster still has room for it (re-checked each time); actors that die in
  `Stage.setup` fail the node at once with the setup error, as that would repeat on every actor;
- a shard whose code raised is retried on any actor, `max_retries` times, then recorded as failed;
- when no alive node can host an actor any more, `PlacementError` (never an endless wait).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.cluster import alive_nodes, capacity, check_placement, demand, describe, fmt, where
from pipeline.progress import NodeRun
from pipeline.shard_run import error_reason, run_shard
from pipeline.shards import ShardDone, shard_name
from pipeline.stage import Resources, ShardPlan, Stage, StageContext
from pipeline.threads import pinned_torch_threads

RECHECK_S = 5.0  # how often a pool without a ready actor re-checks that the cluster can still host one


class _ShardActor:
    """Holds one stage instance with its models loaded once; processes shards sent to it."""

    def __init__(self, stage_cls: type[Stage], context: StageContext, torch_threads: int = 0) -> None:
        self.torch_threads = torch_threads
        with pinned_torch_threads(torch_threads):
            self.stage = stage_cls(context)
            self.stage.setup()

    def ready(self) -> dict[str, Any]:
        return where()

    def run(self, plan: ShardPlan, batch_size: int) -> ShardDone:
        with pinned_torch_threads(self.torch_threads):
            return run_shard(self.stage, plan, batch_size)


@dataclass
class _Slot:
    actor: Any
    ready_ref: Any
    where: dict[str, Any] | None = None
    plan: ShardPlan | None = None
    run_ref: Any = None


class ActorPool:
    """Runs shards on supervised actors of `stage_cls` (see the module doc)."""

    def __init__(self, stage_cls: type[Stage], context: StageContext, resources: Resources,
                 node_run: NodeRun) -> None:
        import ray

        self.node, self.resources, self.node_run = context.node, resources, node_run
        self.wanted = demand(resources.num_cpus, resources.num_gpus, resources.custom_resources)
        self.fix = f"{self.node}.resources.num_cpus / num_gpus / custom_resources"
        self.actor_cls = ray.remote(_ShardActor).options(  # spread: a lost node costs as few actors as possible
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, resources=resources.custom_resources or None,
            max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD")
        self.args = (stage_cls, ray.put(context), resources.torch_threads)
        self.slots: list[_Slot] = []
        self.refs: dict[Any, tuple[_Slot, str]] = {}
        self.attempts: dict[int, int] = {}
        self.failures: dict[int, str] = {}
        self.started = 0
        self.budget = max(1, resources.pool_size) * (resources.max_retries + 2)

    def run(self, plans: list[ShardPlan], finished: Callable[[ShardDone, dict[str, Any]], None]) -> dict[int, str]:
        """Run every plan; return {shard index: reason} of the shards that failed after all retries."""
        import ray

        size = max(1, self.resources.pool_size)
        target = check_placement(self.node, "each actor of the pool", self.wanted, size, self.fix)
        if target < size:
            self.node_run.note(f"pool_size={size} actors of {fmt(self.wanted)} but the cluster holds only "
                               f"{target} at once ({describe(alive_nodes())}); running with {target} actors")
        for _ in range(target):
            self._start()
        queue, checked = deque(plans), time.monotonic()
        try:
            while queue or any(slot.plan for slot in self.slots):
                self.node_run.check_abort()
                if not self.slots:  # every actor died and none was replaced
                    check_placement(self.node, "each actor of the pool", self.wanted, size, self.fix)
                    if self.started >= self.budget:
                        self._give_up(queue, f"{self.started} actors died; the pool gives up on this shard")
                        break
                    self._start()
                self._dispatch(queue)
                ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=1.0)
                for ref in ready:
                    self._handle(ref, queue, finished)
                if not any(slot.where for slot in self.slots) and time.monotonic() - checked > RECHECK_S:
                    check_placement(self.node, "each actor of the pool", self.wanted, size, self.fix)
                    checked = time.monotonic()
                self.node_run.check_stall(lambda: self._pending(queue))
        finally:
            for slot in self.slots:
                ray.kill(slot.actor)
        return self.failures

    def _start(self) -> None:
        actor = self.actor_cls.remote(*self.args)
        slot = _Slot(actor, actor.ready.remote())
        self.refs[slot.ready_ref] = (slot, "ready")
        self.slots.append(slot)
        self.started += 1

    def _dispatch(self, queue: deque[ShardPlan]) -> None:
        for slot in self.slots:
            if queue and slot.where is not None and slot.plan is None:
                slot.plan = queue.popleft()
                slot.run_ref = slot.actor.run.remote(slot.plan, self.resources.batch_size)
                self.refs[slot.run_ref] = (slot, "run")

    def _handle(self, ref: Any, queue: deque[ShardPlan],
                finished: Callable[[ShardDone, dict[str, Any]], None]) -> None:
        import ray

        slot, kind = self.refs.pop(ref)
        if kind == "ready":
            try:
                slot.where = ray.get(ref)
            except ray.exceptions.RayError as error:
                self._lost(slot, error)
            return
        plan, slot.plan = slot.plan, None
        try:
            done = ray.get(ref)
        except ray.exceptions.RayTaskError as error:  # the shard's code raised; the actor lives on
            self._retry(plan, error, queue)
        except ray.exceptions.RayError as error:  # the actor (or its node) is gone
            self._retry(plan, error, queue)
            self.node_run.redispatched += 1
            self._lost(slot, error)
        else:
            finished(done, slot.where or {})

    def _retry(self, plan: ShardPlan, error: BaseException, queue: deque[ShardPlan]) -> None:
        self.attempts[plan.index] = self.attempts.get(plan.index, 0) + 1
        if self.attempts[plan.index] > self.resources.max_retries:
            self.failures[plan.index] = error_reason(error)
            self.node_run.note(f"shard {shard_name(plan.index)} failed {self.attempts[plan.index]} times, last: "
                               f"{self.failures[plan.index]}")
        else:
            queue.appendleft(plan)

    def _lost(self, slot: _Slot, error: BaseException) -> None:
        """Drop a dead actor; start a replacement while the cluster has room and the budget lasts."""
        import ray

        self.slots.remove(slot)
        for ref in [r for r, (s, _) in self.refs.items() if s is slot]:
            del self.refs[ref]
        ray.kill(slot.actor)
        if getattr(error, "actor_init_failed", False):
            raise RuntimeError(f"{self.node}: the stage's setup failed on an actor: {error_reason(error)}")
        place = f"on node {slot.where['node_id'][:12]} ({slot.where['ip']})" if slot.where else "before it was ready"
        room = capacity(self.wanted, alive_nodes())
        if len(self.slots) < min(room, max(1, self.resources.pool_size)) and self.started < self.budget:
            self.node_run.note(f"an actor died {place} ({error_reason(error, 120)}); its shard goes back to the "
                               f"queue and a replacement starts")
            self._start()
        else:
            self.node_run.note(f"an actor died {place} ({error_reason(error, 120)}); its shard goes back to the "
                               f"queue; the pool goes on with {len(self.slots)} actor(s)")

    def _give_up(self, queue: deque[ShardPlan], reason: str) -> None:
        for plan in queue:
            self.failures[plan.index] = reason
        queue.clear()

    def _pending(self, queue: deque[ShardPlan]) -> str:
        busy = [f"shard {shard_name(s.plan.index)} on node {s.where['node_id'][:12]} ({s.where['ip']})"
                for s in self.slots if s.plan is not None and s.where]
        waiting = sum(1 for s in self.slots if s.where is None)
        return (f"{'; '.join(busy) or 'no shard in flight'}; {len(queue)} queued; {waiting} actor(s) of "
                f"{fmt(self.wanted)} not placed or still loading; cluster: {describe(alive_nodes())}")
