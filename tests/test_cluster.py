"""The DAG on a multi-node Ray cluster (every node on this machine, started and stopped by this module).

One `ray.cluster_utils.Cluster` for the module: a head with 0 CPUs and three 2-CPU worker nodes. The tests run in
file order and the node-loss tests remove a worker each (not gracefully), so later tests run on fewer nodes:
an unplaceable pool and trainer fail fast; a trainer worker killed mid-training resumes from its checkpoint to the
same model; a CPU stage (wordgrid) and a model stage (pseudolabel, concurrent with wordgrid) each lose a worker
node mid-stage and still finish with bytes equal to a clean sequential run. The model stage loses the node on
which a pool actor runs a shard at that moment (found by process title under that node's raylet), so the test
always exercises the re-dispatch of an in-flight shard.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.run import compose, main, run
from pipeline.shards import open_stage

pytestmark = pytest.mark.slow
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is left as it is: this process (the driver) read it when it imported Ray, and
# the cluster's processes must agree with it on the address they bind (loopback or this machine's interface).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_timeout_ms": 1000}
WORDGRID = ["wordgrid.num_samples=4000", "wordgrid.samples_per_shard=100"]
TRAIN = ["train_ifseg.loop.steps=40", "train_ifseg.loop.checkpoint_every=5", "train_ifseg.loop.log_every=10",
         "train_ifseg.prompt_templates=single", "train_ifseg.batch_size=4", "train_ifseg.ifseg.width=32",
         "train_ifseg.ifseg.depth=1", "train_ifseg.ifseg.heads=2", "train_ifseg.ifseg.label_size=16",
         "train_ifseg.resources.num_workers=1", "train_ifseg.resources.cpus_per_worker=1",
         "train_ifseg.resources.max_failures=2", "train_ifseg.resources.torch_threads=1"]
PSEUDO = ["toy.train_images=16", "toy.size=64", "pseudolabel.samples_per_shard=2", "pseudolabel.amg.points_per_side=4"]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_ENV.items():
            patch.setenv(name, value)
        patch.delenv("RAY_ADDRESS", raising=False)
        temp_dir = tempfile.mkdtemp(prefix="raycl", dir="/tmp")
        # Ray writes the cluster's address to <RAY_TMPDIR>/ray/ray_current_cluster (it does not create the folder):
        # here, not /tmp/ray, where a stale address file would capture other runs on this machine
        os.makedirs(os.path.join(temp_dir, "ray"))
        patch.setenv("RAY_TMPDIR", temp_dir)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": False, "_system_config": FAST_HEALTH})
        for _ in range(3):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster")


def on_cluster(cluster, root: Path, *overrides: str) -> list[str]:
    return [f"output_root={root}", "executor=ray", f"ray.address={cluster.address}", "stall_timeout_s=20", *overrides]


def local(root: Path, *overrides: str) -> dict:
    return compose("demo", [f"output_root={root}", "executor=local", *overrides])


def markers(root: Path, node: str) -> list[Path]:
    return list(root.glob(f"{node}/*/*.done.json"))


def remove_worker_when(cluster, pick: Callable[[], object], run_future: Future) -> object:
    """Remove the worker node `pick()` returns (not gracefully) as soon as it returns one; return that node."""
    while (node := pick()) is None:
        assert not run_future.done(), f"the run ended before a node could be removed: {run_future.result()}"
        time.sleep(0.05)
    cluster.remove_node(node, allow_graceful=False)
    return node


def first_worker(cluster) -> object:
    return sorted(cluster.worker_nodes, key=lambda n: n.unique_id)[0]


def _process_parents() -> dict[int, int]:
    """pid -> parent pid of every process on this machine."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def _has_title(pid: int, title: bytes) -> bool:
    try:
        return title in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def node_running(cluster, title: bytes) -> tuple[object, int] | None:
    """The worker node one of whose worker processes runs `title` now, e.g. b"ray::_ShardActor.run" (Ray titles
    a worker process by the task it executes; a node's workers are children of its raylet), and that process's
    pid; else None."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in cluster.worker_nodes}
    for pid, parent in _process_parents().items():
        if parent in raylets and _has_title(pid, title):
            return raylets[parent], pid
    return None


def lose_node_running_a_shard(cluster, lost: Path, run_future: Future) -> object:
    """Once a pseudolabel shard has committed, lose the node where a pool actor runs a shard now, the way a machine
    is lost: its shard's process dies at once (SIGKILL), then the node (a removed raylet alone lets the worker
    finish and return its shard to the driver, which then redispatches nothing)."""
    while (found := node_running(cluster, b"ray::_ShardActor.run") if markers(lost, "pseudolabel") else None) is None:
        assert not run_future.done(), f"the run ended before a node could be removed: {run_future.result()}"
        time.sleep(0.05)
    node, pid = found
    os.kill(pid, signal.SIGKILL)
    cluster.remove_node(node, allow_graceful=False)
    return node


def same_outputs(a: Path, b: Path, node: str) -> None:
    first, second = open_stage(str(a / node)), open_stage(str(b / node))
    assert first.fingerprint == second.fingerprint
    assert Path(first.path, "manifest.json").read_bytes() == Path(second.path, "manifest.json").read_bytes()
    for x, y in zip(first.shard_urls(), second.shard_urls(), strict=True):
        assert Path(x).read_bytes() == Path(y).read_bytes(), x


def record(root: Path, node: str) -> dict:
    return json.loads(Path(open_stage(str(root / node)).path, "run.json").read_text())


@pytest.mark.parametrize("overrides, message", [
    (["stages=[pseudolabel]", *PSEUDO, "pseudolabel.resources.num_gpus=1"],
     r"pseudolabel: each actor of the pool asks for \{CPU: 1, GPU: 1\}.*cluster has 4 node\(s\): 1 x \{CPU: 0\}, "
     r"3 x \{CPU: 2\}"),
    (["stages=[wordgrid,train_ifseg]", *WORDGRID, *TRAIN, "train_ifseg.resources.num_workers=8"],
     r"train_ifseg: the Ray Train worker group asks for 8 x \{CPU: 1\} at once.*room for 6"),
    (["stages=[wordgrid]", "force=[wordgrid]", *WORDGRID, "+wordgrid.resources.custom_resources.accelerator_a100=1"],
     r"wordgrid: each task asks for \{CPU: 1, accelerator_a100: 1\}.*room for 0.*3 x \{CPU: 2\}; lower "
     r"wordgrid.resources.num_cpus / custom_resources"),
    (["stages=[wordgrid,train_ifseg]", *WORDGRID, *TRAIN, "+train_ifseg.resources.custom_resources.tpu=1"],
     r"train_ifseg: the Ray Train worker group asks for 1 x \{CPU: 1, tpu: 1\} at once"),
])
def test_a_request_the_cluster_cannot_place_fails_fast_naming_node_demand_and_cluster(cluster, work, capsys,
                                                                                       overrides, message):
    pool = ThreadPoolExecutor(1)  # a hang fails the test instead of blocking it
    try:
        code = pool.submit(main, on_cluster(cluster, work / "unplaceable", *overrides)).result(timeout=60)
    finally:
        pool.shutdown(wait=False)
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes among this test process' descendants (the module's cluster only)."""
    parents = _process_parents()
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
    return [pid for pid in mine if _has_title(pid, b"TrainWorker")]


def test_cpu_stage_loses_a_worker_node_and_still_equals_a_clean_run(cluster, work):
    run(local(work / "clean", "stages=[wordgrid]", *WORDGRID))
    lost = work / "lost"
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(main, on_cluster(cluster, lost, "stages=[wordgrid]", *WORDGRID))
        remove_worker_when(cluster, lambda: first_worker(cluster) if len(markers(lost, "wordgrid")) >= 4 else None,
                           future)
        at_removal = len(markers(lost, "wordgrid"))
        assert future.result(timeout=300) == 0
    assert at_removal < 40, "the node must be lost mid-stage"
    same_outputs(work / "clean", lost, "wordgrid")
    assert len(record(lost, "wordgrid")["shards_per_worker_node"]) >= 2  # the work was spread over nodes


def test_trainer_worker_killed_mid_training_resumes_to_the_same_model(cluster, work):
    import torch

    from pipeline.train.checkpoints import read_model

    # train_ifseg.resources.torch_threads=1 (TRAIN): the local reference and the Ray Train worker use the same
    # kernels whatever this process' thread count
    run(local(work / "clean", "stages=[wordgrid,train_ifseg]", *WORDGRID, *TRAIN))
    root = work / "lost"  # wordgrid is up to date there after the previous test
    checkpoints = lambda: list(root.glob("train_ifseg/*/checkpoints/step_*.pt"))  # noqa: E731
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(main, on_cluster(cluster, root, "stages=[wordgrid,train_ifseg]", *WORDGRID, *TRAIN))
        while not (checkpoints() and _train_worker_pids()):
            assert not future.done(), "training ended before its worker could be killed"
            time.sleep(0.05)
        killed_at = sorted(p.name for p in checkpoints())
        for pid in _train_worker_pids():
            os.kill(pid, signal.SIGKILL)
        assert future.result(timeout=600) == 0
    assert "step_0000040.pt" not in killed_at, "the worker must be killed before the last step"
    ours, clean = (read_model(open_stage(str(r / "train_ifseg")))["trainable"] for r in (root, work / "clean"))
    assert ours.keys() == clean.keys()
    assert all(torch.equal(ours[k], clean[k]) for k in ours)


def test_model_stage_loses_a_worker_node_while_a_cpu_stage_runs_concurrently(cluster, work):
    both = ["stages=[wordgrid,pseudolabel]", *WORDGRID, *PSEUDO, "pseudolabel.resources.pool_size=3",
            "wordgrid.resources.num_cpus=0.5"]  # two 2-CPU nodes left: actors on both, wordgrid beside them
    clean, lost = work / "clean-both", work / "concurrent"
    run(local(clean, *both))  # sequential: executor=local runs one node at a time
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(main, on_cluster(cluster, lost, *both))
        removed = lose_node_running_a_shard(cluster, lost, future)
        at_removal = len(markers(lost, "pseudolabel"))
        assert future.result(timeout=600) == 0
    assert at_removal < 8, "the node must be lost mid-stage"
    for node in ("wordgrid", "pseudolabel"):
        same_outputs(clean, lost, node)
    grids, labels = record(lost, "wordgrid"), record(lost, "pseudolabel")
    assert max(grids["started"], labels["started"]) < min(grids["ended"], labels["ended"])  # they overlapped
    assert labels["redispatched"] >= 1 and any("an actor died" in event for event in labels["events"])
    assert any(removed.node_id.startswith(event.split("on node ")[1][:12]) for event in labels["events"]
               if "an actor died on node" in event)  # the lost actor was the one on the removed node
