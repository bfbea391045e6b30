"""Where training runs: the one module that uses Ray Train.

`fit` runs a picklable job's `run_worker()` on Ray Train workers (`TorchTrainer`, `ScalingConfig`: gloo on CPUs,
NCCL/DDP on GPUs, one process per worker) or, with `backend="local"`, in this process (tests, debugging). On a
worker, `worker_device`, `rank_and_world` and `prepare_model` (DDP when there is more than one worker) say where
it runs.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Protocol

import torch

from pipeline.threads import pinned_torch_threads
from pipeline.train.configs import ScalingKnobs


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
    if scaling.backend == "local":
        with pinned_torch_threads(scaling.torch_threads):
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
    trainer = TorchTrainer(
        _ray_worker_entry,
        train_loop_config={"job": job, "torch_threads": scaling.torch_threads},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker,
                                                           **scaling.custom_resources}),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(scaling.max_failures)),
    )
    trainer.fit()
