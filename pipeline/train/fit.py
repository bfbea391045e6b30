"""Where training runs: the one module that uses Ray Train.

`fit` runs a picklable job's `run_worker()` on Ray Train workers (`TorchTrainer`, `ScalingConfig`: gloo on CPUs,
NCCL/DDP on GPUs, one process per worker) or, with `backend="local"`, in this process (tests, debugging). On a
worker, `worker_device`, `rank_and_world` and `prepare_model` (DDP when there is more than one worker) say where
it runs.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from pipeline.threads import pinned_torch_threads
from pipeline.train.configs import ScalingKnobs

log = logging.getLogger(__name__)
PORT_RACE_RETRIES = 3  # worker-group starts retried after a process-group port race (see `retry_port_races`)


class TrainJob(Protocol):
    """What a train stage gives `fit`: picklable, builds everything on the worker."""

    def run_worker(self) -> None: ...


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_device(use_gpu: bool) -> torch.device:
    """The device of this worker: Ray Train's when running under it, else cuda:0 or cpu."""
    if use_gpu and torch.cuda.is_available():
        try:
            import ray.train.torch

            return ray.train.torch.get_device()
        except (ImportError, RuntimeError):
            return torch.device("cuda", 0)
    return torch.device("cpu")


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself on a single worker; wrapped for DDP by Ray Train when there are several."""
    if rank_and_world()[1] == 1:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})


def _ray_worker_entry(config: dict[str, Any]) -> None:
    with pinned_torch_threads(config.get("torch_threads", 0)):
        config["job"].run_worker()


def fit(job: TrainJob, scaling: ScalingKnobs, name: str) -> None:
    """Run `job.run_worker()` on Ray Train workers (backend "ray") or in this process (backend "local")."""
    if scaling.backend == "local":  # in the driver: `pipeline.run.run_node` pinned resources.torch_threads
        job.run_worker()
        return
    if scaling.backend != "ray":
        raise ValueError(f"train backend {scaling.backend!r}: choose ray or local")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import check_placement, demand

    node = name.rsplit("-", 1)[0]  # fail fast instead of waiting forever for a worker group that cannot be placed
    per_worker = demand(scaling.cpus_per_worker, float(scaling.use_gpu), scaling.custom_resources)
    check_placement(node, "the Ray Train worker group", per_worker, scaling.num_workers,
                    f"{node}.resources.num_workers / cpus_per_worker / use_gpu / custom_resources", all_at_once=True)
    storage = os.environ.get("SEGETL_RAY_TRAIN_STORAGE") or tempfile.mkdtemp(prefix="segetl-train-")

    def start(attempt: int) -> None:  # a fresh Ray Train run name per attempt
        TorchTrainer(
            _ray_worker_entry,
            train_loop_config={"job": job, "torch_threads": scaling.torch_threads},
            scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker={"CPU": scaling.cpus_per_worker,
                                                               **scaling.custom_resources}),
            run_config=RunConfig(name=f"{name}-{attempt}" if attempt else name, storage_path=storage,
                                 failure_config=FailureConfig(scaling.max_failures)),
        ).fit()

    retry_port_races(start, node)


def retry_port_races(start: Callable[[int], None], node: str, retries: int = PORT_RACE_RETRIES) -> None:
    """Call `start(attempt)`; when it fails because torch's process-group store lost a port race, wait a moment and call
    it again (up to `retries` times; the job resumes from its own newest checkpoint).

    Ray Train picks the rendezvous port by binding port 0 and releasing it; two worker groups starting at once on
    one machine (concurrent DAG nodes) can pick the same port, and the loser fails with EADDRINUSE, which Ray
    Train counts as a non-retryable controller error. Any other failure is raised at once.
    """
    for attempt in range(retries + 1):
        try:
            start(attempt)
            return
        except Exception as error:  # noqa: BLE001 - Ray wraps the cause; it is recognised by its text
            if attempt == retries or "EADDRINUSE" not in str(error) and "address already in use" not in str(error):
                raise
            log.warning("%s: the trainer's process group lost a port race (address already in use); starting the "
                        "worker group again (%d of %d)", node, attempt + 1, retries)
            time.sleep(1.0 + random.random())
