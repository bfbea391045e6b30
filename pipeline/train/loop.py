"""The method-agnostic step loop, its learning-rate schedules, and the `Recipe` a method hands it.

Resuming: the loop restarts at the newest checkpoint's step; the batch stream is asked to start at that step
(`Recipe.batches(start)`), which restarts the data at that step's epoch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

import torch

from pipeline.models.precision import autocast
from pipeline.progress import StepProgress
from pipeline.train.checkpoints import CheckpointStore, load_trainable_state, trainable_state
from pipeline.train.configs import LoopConfig, Schedule
from pipeline.train.fit import rank_and_world

log = logging.getLogger(__name__)
LossFn = Callable[[torch.nn.Module, Any, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Recipe:
    """What one method contributes to the loop.

    Attributes:
        model: the trainable network (frozen parts inside it have requires_grad=False).
        optimizer: over the model's trainable parameters; each group's initial lr is scaled by `lr_factor`.
        loss: (model, batch, step) -> (scalar loss, log values); `model` may be the DDP-wrapped one.
        batches: start step -> endless batch stream beginning at that step's epoch.
        lr_factor: step -> multiplier of each param group's initial lr.
        grad_clip: the method's gradient-norm clip (None or 0 = none); `LoopConfig.grad_clip` overrides it.
        reset_optimizer_at: a step at whose start the optimiser state (moments, step counts) is cleared, as a
            fresh optimiser would start there (ZegCLIP's transductive switch); None = never.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: LossFn
    batches: Callable[[int], Iterator[Any]]
    lr_factor: Callable[[int], float]
    grad_clip: float | None = None
    reset_optimizer_at: int | None = None


def training_loop(model: torch.nn.Module, recipe: Recipe, cfg: LoopConfig, store: CheckpointStore,
                  samples_per_step: int, name: str = "train") -> list[dict[str, float]]:
    """Run steps [resume step, cfg.steps); checkpoint on rank 0; return the logged rows.

    Args:
        model: `recipe.model`, possibly wrapped for DDP (`pipeline.train.fit.prepare_model`).
        recipe: optimiser, loss, batches and lr schedule of the method.
        cfg: steps, checkpointing, logging, gradient clipping, precision.
        store: where checkpoints go and where a resumed run finds them.
        samples_per_step: global samples per step, for throughput logs.
        name: what the progress shows (the node): a bar on a terminal, else a line every 10 s
            (`pipeline.progress.StepProgress`).

    Returns:
        One row per log step: {"step", "lr", "samples_per_s", **the loss's log values}.
    """
    rank, _ = rank_and_world()
    optimizer = recipe.optimizer
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    start = _resume(model, optimizer, store)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and torch.cuda.is_available())
    device = next(model.parameters()).device
    rows: list[dict[str, float]] = []
    stream = recipe.batches(start)
    bar = StepProgress(name, cfg.steps, start, samples_per_step, enabled=rank == 0)
    window_start, window_steps = time.perf_counter(), 0
    model.train()
    grad_clip = recipe.grad_clip if cfg.grad_clip is None else cfg.grad_clip
    for step in range(start, cfg.steps):
        if step == recipe.reset_optimizer_at:
            optimizer.state.clear()
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * recipe.lr_factor(step)
        with autocast(device, cfg.precision):
            loss, logs = recipe.loss(model, next(stream), step)
        _update(loss, optimizer, scaler, grad_clip)
        window_steps += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rate = window_steps * samples_per_step / (time.perf_counter() - window_start)
            rows.append({"step": step + 1, "lr": optimizer.param_groups[0]["lr"], "samples_per_s": rate,
                         **{k: float(v) for k, v in logs.items()}})
            log.info("train %s", json.dumps(rows[-1]))
            window_start, window_steps = time.perf_counter(), 0
            bar.update(1, loss=f"{rows[-1].get('loss', float('nan')):.4f}")
        else:
            bar.update(1)
        if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            store.save(step + 1, {"step": step + 1, "model": trainable_state(model),
                                  "optimizer": optimizer.state_dict()}, cfg.keep_checkpoints)
    bar.close()
    return rows


def _update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            grad_clip: float | None) -> None:
    """One optimiser step on `loss`: backward (scaled for fp16), optional gradient-norm clip, step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()


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

    if name not in get_args(Schedule):
        raise ValueError(f"unknown lr schedule {name!r}: choose one of {', '.join(get_args(Schedule))}")
    return factor
