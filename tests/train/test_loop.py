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


def _ifseg_run(store_dir, steps: int, grids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tiny IFSeg decoder trained on fixed word grids through `training_loop` (AdamW, cosine lr, clip 1.0)."""
    from pipeline.methods.ifseg import IFSegConfig, IFSegMethod
    from pipeline.train.configs import LoopConfig
    from pipeline.train.loop import Recipe, lr_schedule, training_loop

    torch.manual_seed(0)
    cfg = IFSegConfig(width=16, depth=1, heads=2, dropout=0.0, drop_path=0.0, pos_grid=4, grid_size=4,
                      label_size=8, lr=1e-2)
    method = IFSegMethod(cfg, torch.nn.functional.normalize(torch.randn(5, 8), dim=-1))
    model = method.build_model()

    def batches(start):  # step s trains on grids [2s, 2s + 1] (mod len): a stream that resumes exactly
        step = start
        while True:
            yield {"grids": [grids[(2 * step) % len(grids)], grids[(2 * step + 1) % len(grids)]]}
            step += 1

    recipe = Recipe(model, method.build_optimizer(model), lambda m, b, s: method.loss(m, b), batches,
                    lr_schedule("cosine", 6), cfg.grad_clip)
    training_loop(model, recipe, LoopConfig(steps=steps, checkpoint_every=2, log_every=100), CheckpointStore(
        str(store_dir)), 2)
    return trainable_state(model)


def test_resumed_training_equals_the_uninterrupted_run(tmp_path):
    """Kill after step 4 (its checkpoint), restart with a fresh model: the final weights equal a straight run's."""
    generator = torch.Generator().manual_seed(0)
    grids = [torch.randint(0, 5, (2, 3), generator=generator) for _ in range(7)]
    straight = _ifseg_run(tmp_path / "straight", 6, grids)
    _ifseg_run(tmp_path / "killed", 4, grids)  # stands for a run killed right after its step-4 checkpoint
    assert CheckpointStore(str(tmp_path / "killed")).steps() == [2, 4]
    resumed = _ifseg_run(tmp_path / "killed", 6, grids)  # a fresh model: weights, AdamW state, lr from step 4
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    _ifseg_run(tmp_path / "partial", 4, grids)
    store = CheckpointStore(str(tmp_path / "partial"))
    state = store.load_latest()
    state["optimizer"]["state"] = {}  # a resume that forgot the optimiser moments would not match
    store.save(4, state, keep=2)
    assert not all(torch.equal(straight[n], v) for n, v in _ifseg_run(tmp_path / "partial", 6, grids).items())
