"""Training plumbing shared by every method: the step loop, checkpoints, and the one place that uses Ray Train.

A method (stages/train.py) hands `fit` a picklable job whose `run_worker()` builds its model and data on the
worker and calls `training_loop`. With `backend="ray"` the job runs on Ray Train (`TorchTrainer`,
`ScalingConfig`): gloo on CPUs, NCCL/DDP on GPUs, one process per worker; with `backend="local"` it runs in
this process (tests, debugging).

Checkpoints are files under `<stage output>/checkpoints/step_NNNNNNN.pt` written by rank 0 with an atomic
commit, so a killed run restarts from the newest complete one; the data stream restarts at that step's epoch.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import torch
from tqdm import tqdm

from pipeline.shards import join, write_atomic

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "step_"


class TrainJob(Protocol):
    """What a method gives the trainer: picklable, builds everything on the worker."""

    def run_worker(self) -> None: ...


@dataclass
class LoopConfig:
    """Knobs of the step loop (part of every train node's config).

    Attributes:
        steps: optimiser updates in total.
        checkpoint_every: steps between checkpoints (the last step is always checkpointed).
        keep_checkpoints: how many recent checkpoints to keep (older ones are deleted).
        log_every: steps between log lines (loss, lr, samples/s).
        grad_clip: max gradient norm (0 = off).
        precision: "fp32" | "bf16" (autocast; CPU and CUDA) | "fp16" (CUDA autocast + GradScaler).
    """

    steps: int = 2000
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    grad_clip: float = 1.0
    precision: str = "fp32"


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


class CheckpointStore:
    """Numbered checkpoints under `<url>/checkpoints/` on any fsspec filesystem."""

    def __init__(self, url: str) -> None:
        self.fs, path = fsspec.core.url_to_fs(url)
        self.dir = join(path, "checkpoints")

    def steps(self) -> list[int]:
        if not self.fs.exists(self.dir):
            return []
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.dir, detail=False)]
        return sorted(int(n[len(CHECKPOINT_PREFIX):-3]) for n in names
                      if n.startswith(CHECKPOINT_PREFIX) and n.endswith(".pt"))

    def path(self, step: int) -> str:
        return join(self.dir, f"{CHECKPOINT_PREFIX}{step:07d}.pt")

    def save(self, step: int, state: dict[str, Any], keep: int) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self.fs, self.path(step), buffer.getvalue())
        for old in self.steps()[:-keep] if keep > 0 else []:
            self.fs.rm_file(self.path(old))

    def load_latest(self) -> dict[str, Any] | None:
        steps = self.steps()
        if not steps:
            return None
        with self.fs.open(self.path(steps[-1]), "rb") as handle:
            return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state of the trainable parameters only (frozen backbones are rebuilt from their own weights)."""
    module = getattr(model, "module", model)  # unwrap DDP
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if k in names}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `trainable_state` output; every trainable parameter must be present."""
    module = getattr(model, "module", model)
    expected = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(state))
    if missing:
        raise KeyError(f"checkpoint lacks trainable parameters {missing[:5]} (and {max(0, len(missing) - 5)} more)")
    module.load_state_dict(state, strict=False)


def training_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Callable[[int], Iterator[Any]],
                  loss_fn: Callable[[Any, int], tuple[torch.Tensor, dict[str, float]]],
                  lr_factor: Callable[[int], float], cfg: LoopConfig, store: CheckpointStore,
                  samples_per_step: int) -> list[dict[str, float]]:
    """Run steps [resume step, cfg.steps); checkpoint on rank 0; return the logged rows.

    Args:
        batches: epoch-independent batch stream starting at a given step (called once, with the start step).
        loss_fn: (batch, step) -> (scalar loss, log values).
        lr_factor: step -> multiplier of each param group's initial lr.
        samples_per_step: global samples per step, for throughput logs.
    """
    rank, _ = rank_and_world()
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    start = _resume(model, optimizer, store)
    use_scaler = cfg.precision == "fp16" and torch.cuda.is_available()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    device_type = next(model.parameters()).device.type
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    rows: list[dict[str, float]] = []
    stream = batches(start)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=rank != 0, mininterval=1.0)
    window_start, window_steps = time.perf_counter(), 0
    model.train()
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(step)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss, logs = loss_fn(next(stream), step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        bar.update(1)
        window_steps += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rate = window_steps * samples_per_step / (time.perf_counter() - window_start)
            row = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"], "samples_per_s": rate,
                   **{k: float(v) for k, v in logs.items()}}
            rows.append(row)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}")
            log.info("train %s", json.dumps(row))
            window_start, window_steps = time.perf_counter(), 0
        if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            store.save(step + 1, {"step": step + 1, "model": trainable_state(model),
                                  "optimizer": optimizer.state_dict()}, cfg.keep_checkpoints)
    bar.close()
    return rows


def _resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer, store: CheckpointStore) -> int:
    state = store.load_latest()
    if state is None:
        return 0
    load_trainable_state(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resumed from checkpoint at step %d", state["step"])
    return int(state["step"])


def lr_schedule(name: str, steps: int, warmup: int = 0, power: float = 0.9, min_factor: float = 0.0
                ) -> Callable[[int], float]:
    """Learning-rate multiplier per step: "constant", "cosine" or "poly", after a linear warmup."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        if name == "cosine":
            return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        if name == "poly":
            return min_factor + (1 - min_factor) * (1 - progress) ** power
        return 1.0

    if name not in ("constant", "cosine", "poly"):
        raise ValueError(f"unknown lr schedule {name!r}: choose constant, cosine or poly")
    return factor


@dataclass
class ScalingKnobs:
    """Where training runs (never part of the fingerprint).

    Attributes:
        backend: "ray" (Ray Train TorchTrainer) or "local" (this process).
        num_workers: Ray Train workers (processes; DDP across them).
        use_gpu: one GPU per worker.
        cpus_per_worker: CPUs reserved per worker.
        max_failures: worker-group restarts Ray Train attempts; each resumes from the last checkpoint.
    """

    backend: str = "ray"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1


def _ray_worker_entry(config: dict[str, Any]) -> None:
    config["job"].run_worker()


def fit(job: TrainJob, scaling: ScalingKnobs, name: str) -> None:
    """Run `job.run_worker()` on Ray Train workers (backend "ray") or in this process (backend "local")."""
    if scaling.backend == "local":
        job.run_worker()
        return
    if scaling.backend != "ray":
        raise ValueError(f"train backend {scaling.backend!r}: choose ray or local")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import check_placement, demand

    node = name.rsplit("-", 1)[0]  # fail fast instead of waiting forever for a worker group that cannot be placed
    check_placement(node, "the Ray Train worker group", demand(scaling.cpus_per_worker, float(scaling.use_gpu)),
                    scaling.num_workers, f"{node}.resources.num_workers / cpus_per_worker / use_gpu", all_at_once=True)
    storage = os.environ.get("SEGETL_RAY_TRAIN_STORAGE") or tempfile.mkdtemp(prefix="segetl-train-")
    trainer = TorchTrainer(
        _ray_worker_entry,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(scaling.max_failures)),
    )
    trainer.fit()
