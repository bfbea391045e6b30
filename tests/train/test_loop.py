"""The method-agnostic trainer parts: learning-rate schedules, the checkpoint store and model.pt."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.checkpoints import CheckpointStore, trainable_state
from pipeline.train.loop import lr_schedule


def test_lr_schedules_hand_computed():
    cosine = lr_schedule("cosine", steps=10, warmup=2)
    assert cosine(0) == 0.5 and cosine(1) == 1.0 and cosine(2) == 1.0
    assert math.isclose(cosine(6), 0.5) and math.isclose(cosine(10), 0.0, abs_tol=1e-12)
    poly = lr_schedule("poly", steps=10, power=1.0)
    assert math.isclose(poly(5), 0.5)
    with pytest.raises(ValueError, match="cosine"):
        lr_schedule("step", 10)


def test_checkpoint_store_keeps_the_newest(tmp_path):
    store = CheckpointStore(str(tmp_path))
    model = torch.nn.Linear(2, 2)
    for step in (10, 20, 30):
        store.save(step, {"step": step, "model": trainable_state(model)}, keep=2)
    assert store.steps() == [20, 30]
    assert store.load_latest()["step"] == 30


def test_model_file_keeps_only_trainable_weights_and_the_config(tmp_path):
    import fsspec

    from pipeline.shards import StageOutput, write_stage_index
    from pipeline.train.checkpoints import load_trainable_state, read_model, save_model

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # a frozen part: rebuilt from its own weights, never stored
    save_model(str(tmp_path), "ifseg", model, {"method": "ifseg", "vocab": "toy"})
    write_stage_index(fsspec.filesystem("file"), str(tmp_path), {"fingerprint": "fp", "shards": []}, [])
    artifact = read_model(StageOutput(str(tmp_path)))
    assert artifact["method"] == "ifseg" and artifact["config"] == '{"method": "ifseg", "vocab": "toy"}'
    assert sorted(artifact["trainable"]) == ["0.bias", "1.bias", "1.weight"]
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    fresh[0].weight.requires_grad_(False)
    load_trainable_state(fresh, artifact["trainable"])
    assert torch.equal(fresh[1].weight, model[1].weight) and not torch.equal(fresh[0].weight, model[0].weight)
    with pytest.raises(KeyError, match="lacks trainable parameters"):
        load_trainable_state(fresh, {})


def _linear_run(tmp_path, name: str, steps: int, loss_scale: float = 1.0, grad_clip=None, loop_clip=None,
                reset_at=None, optimizer: str = "sgd"):
    """Train w (one weight, start 0) on loss = loss_scale · w · x with x = step + 1; returns the final w."""
    from pipeline.train.configs import LoopConfig
    from pipeline.train.loop import Recipe, training_loop

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = (torch.optim.SGD(model.parameters(), lr=1.0) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0))

    def batches(start):
        step = start
        while True:
            step += 1
            yield torch.tensor([[float(step)]])

    def loss(m, batch, step):
        value = loss_scale * m(batch).sum()
        return value, {"loss": value.item()}

    recipe = Recipe(model, opt, loss, batches, lambda step: 1.0, grad_clip, reset_at)
    cfg = LoopConfig(steps=steps, checkpoint_every=100, log_every=100, grad_clip=loop_clip)
    training_loop(model, recipe, cfg, CheckpointStore(str(tmp_path / name)), 1)
    return model.weight.item()


def test_gradients_are_not_clipped_unless_the_method_or_loop_asks(tmp_path):
    from pipeline.config import build_config
    from stages.train.stage import TrainConfig

    assert _linear_run(tmp_path, "free", 1, loss_scale=1000.0) == -1000.0  # SGD lr 1, gradient 1000
    assert _linear_run(tmp_path, "method", 1, loss_scale=1000.0, grad_clip=1.0) == pytest.approx(-1.0)
    assert _linear_run(tmp_path, "loop", 1, loss_scale=1000.0, grad_clip=1.0, loop_clip=0.0) == -1000.0
    zegclip = build_config(TrainConfig, {"method": "zegclip"}, "train_zegclip")
    assert zegclip.loop.grad_clip is None and zegclip.zegclip.grad_clip is None and zegclip.align.grad_clip is None
    assert zegclip.ifseg.grad_clip == 1.0  # IFSeg's fairseq --clip-norm 1.0


def test_optimizer_state_is_cleared_at_the_reset_step(tmp_path):
    """AdamW reset at step 2 = a fresh AdamW from the step-2 weights (the release's --load-from second run)."""
    reset = _linear_run(tmp_path, "reset", 4, reset_at=2, optimizer="adamw")
    kept = _linear_run(tmp_path, "kept", 4, optimizer="adamw")
    # fresh Adam's first step moves by exactly lr (m/sqrt(v) = ±1 with bias correction): w = -0.1 per fresh start
    by_hand = torch.nn.Parameter(torch.zeros(1))
    for fresh_from in (0, 2):
        adam = torch.optim.AdamW([by_hand], lr=0.1, weight_decay=0.0)
        for step in range(fresh_from, fresh_from + 2):
            adam.zero_grad()
            (by_hand * (step + 1)).sum().backward()
            adam.step()
    assert reset == pytest.approx(by_hand.item(), abs=1e-7) and reset != pytest.approx(kept, abs=1e-4)
