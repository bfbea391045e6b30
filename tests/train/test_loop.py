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
