"""The train stage end to end: model.pt and log, typed-config errors, resume after a kill, Ray Train, predictors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.data.vocab import load_vocab
from pipeline.methods.ifseg import knn_postprocess
from pipeline.models.preprocess import normalize
from pipeline.predict.load_trained import load_trained
from pipeline.run import compose, run
from pipeline.shards import open_stage
from pipeline.train.checkpoints import CheckpointStore, read_model

REPO = Path(__file__).resolve().parents[2]
FAST = ["wordgrid.num_samples=400", "wordgrid.samples_per_shard=100",
        "train_ifseg.ifseg.label_size=32", "train_ifseg.batch_size=8"]


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"output_root={root}", "executor=local", "stages=[wordgrid,train_ifseg]", *FAST, *extra]


def test_train_ifseg_on_word_grids_writes_model_and_log(tmp_path):
    summaries = run(compose("demo", overrides(tmp_path, "train_ifseg.loop.steps=12",
                                              "train_ifseg.loop.checkpoint_every=5")))
    assert [(s.node, s.status) for s in summaries] == [("wordgrid", "ran"), ("train_ifseg", "ran")]
    output = open_stage(str(tmp_path / "train_ifseg"))
    assert output.manifest["final_log"]["step"] == 12
    assert CheckpointStore(output.path).steps() == [10, 12]
    log = [json.loads(line) for line in Path(output.path, "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12 and log[-1]["loss"] > 0
    again = run(compose("demo", overrides(tmp_path, "train_ifseg.loop.steps=12",
                                          "train_ifseg.loop.checkpoint_every=5")))
    assert [s.status for s in again] == ["up to date", "up to date"]


def test_forced_training_starts_from_step_zero_not_from_the_last_checkpoint(tmp_path):
    knobs = ["train_ifseg.loop.steps=6", "train_ifseg.loop.checkpoint_every=3", "train_ifseg.loop.log_every=1"]
    run(compose("demo", overrides(tmp_path, *knobs)))
    output = open_stage(str(tmp_path / "train_ifseg"))
    first_log = Path(output.path, "train_log.jsonl").read_text()
    first_model = read_model(output)["trainable"]
    summaries = run(compose("demo", overrides(tmp_path, *knobs, "force=[train_ifseg]")))
    assert [(s.node, s.status) for s in summaries] == [("wordgrid", "up to date"), ("train_ifseg", "ran")]
    again = open_stage(str(tmp_path / "train_ifseg"))
    rows = [json.loads(line) for line in Path(again.path, "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]  # trained again, not resumed at step 6
    assert again.manifest["final_log"]["step"] == 6
    assert len(first_log.splitlines()) == 6
    second_model = read_model(again)["trainable"]
    assert all(torch.equal(first_model[k], second_model[k]) for k in first_model)  # deterministic on CPU


def test_predictor_serves_any_vocabulary(tmp_path):
    # without the word cross-attention a class's logits do not depend on the other words, so a subset vocabulary
    # must give exactly the full vocabulary's channels (with it, the words are context: see tests/methods)
    run(compose("demo", overrides(tmp_path, "train_ifseg.loop.steps=2",
                                  "+train_ifseg.ifseg.word_cross_attention=false")))
    output = open_stage(str(tmp_path / "train_ifseg"))
    toy = load_trained(output, load_vocab("toy"))
    pixels = torch.rand(1, 3, 60, 52)  # not a multiple of the patch (8): padded, then cropped back
    assert toy.logits(pixels).shape == (1, 12, 60, 52)
    subset = load_vocab("toy").subset(["sky", "road", "car"], name="three")
    three = load_trained(output, subset).logits(pixels)
    assert three.shape == (1, 3, 60, 52)
    assert torch.allclose(three, toy.logits(pixels)[:, [0, 2, 7]], atol=1e-4)  # same model, classifier subset
    served = load_trained(output, load_vocab("toy"), knn=True)
    knn = served.logits(pixels)
    # IFSeg §1.5: K = 3 neighbours of the *backbone* features, 25 rounds on softmax probabilities, then upsample
    # the probabilities (bilinear) to the padded size (60x52 -> 64x56 at patch 8) and crop back.
    features, _ = served.clip.dense_features(F.pad(normalize(pixels, served.clip.mean, served.clip.std), (0, 4, 0, 4)))
    grid = knn_postprocess(served.model(features), features, k=3, iterations=25)
    expected = F.interpolate(grid, size=(64, 56), mode="bilinear", align_corners=False)[:, :, :60, :52]
    assert torch.allclose(knn, expected, atol=1e-5)
    assert not torch.allclose(knn, toy.logits(pixels).softmax(1), atol=1e-2)  # propagation changed the scores


def test_wrong_ports_for_method_fail_before_work(tmp_path):
    with pytest.raises(ConfigError, match="inputs must name port"):
        run(compose("demo", overrides(tmp_path, "train_ifseg.method=align")))
    assert not (tmp_path / "train_ifseg").exists()


@pytest.mark.parametrize("override, key", [
    ("+train_ifseg.ifseg.lrr=1", r"train_ifseg\.ifseg\.lrr: unknown config key;"),
    ("+train_ifseg.clip.pretraind=x", r"train_ifseg\.clip\.pretraind: unknown config key;"),
    ("+train_ifseg.dinov2.weigths=x", r"train_ifseg\.dinov2\.weigths: unknown config key;"),
    ("+train_ifseg.loop.step=3", r"train_ifseg\.loop\.step: unknown config key;"),
    ("train_ifseg.ifseg.width=wide", r"train_ifseg\.ifseg\.width='wide': expected int"),
    ("train_ifseg.method=segformer", r"train_ifseg\.method='segformer': expected one of \['ifseg', 'align', "),
    ("+train_ifseg.zegclip.mode=semi", r"train_ifseg\.zegclip\.mode='semi': expected one of"),
    ("train_ifseg.loop.precision=fp8", r"train_ifseg\.loop\.precision='fp8'"),
    ("train_ifseg.prompt_templates=nope", r"train_ifseg\.prompt_templates='nope'"),
])
def test_typos_in_method_model_and_loop_knobs_fail_on_the_driver_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        run(compose("demo", overrides(tmp_path, override)))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_method_knob_typo_exits_2_from_the_cli_before_any_output(tmp_path):
    cli = [sys.executable, "-m", "pipeline.run", "conf=demo", "stages=[train_ifseg]", f"output_root={tmp_path / 'out'}",
           "+train_ifseg.ifseg.lrr=1"]
    result = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train_ifseg.ifseg.lrr: unknown config key" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_every_method_has_a_builder_and_ports():
    from typing import get_args

    from pipeline.methods.configs import MethodName
    from pipeline.methods.registry import METHODS
    from stages.train.stage import METHOD_PORTS

    assert set(METHODS) == set(get_args(MethodName)) == set(METHOD_PORTS)


@pytest.mark.slow
def test_killed_training_resumes_from_last_checkpoint(tmp_path):
    cli = [sys.executable, "-m", "pipeline.run", *overrides(tmp_path, "train_ifseg.loop.steps=150",
                                                           "train_ifseg.loop.checkpoint_every=20")]
    process = subprocess.Popen(cli, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    checkpoints = tmp_path / "train_ifseg"
    while time.time() < deadline and not list(checkpoints.glob("*/checkpoints/step_*.pt")):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = sorted(checkpoints.glob("*/checkpoints/step_*.pt"))
    assert saved, "no checkpoint before the kill"
    assert not list(checkpoints.glob("*/model.pt"))
    first = int(saved[-1].stem.split("_")[1])
    resumed = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from checkpoint at step {first}" in resumed.stderr
    assert open_stage(str(checkpoints)).manifest["final_log"]["step"] == 150


@pytest.mark.slow
def test_ray_train_backend(tmp_path):
    """Two DDP workers equal one local worker: 8 grids in 2 shards, global batch 8, so every step each rank takes
    its whole shard (4 grids) and the all-reduced mean gradient is the local batch-8 gradient (no dropout)."""
    import ray

    tiny = ["stages=[wordgrid,train_ifseg]", "wordgrid.num_samples=8", "wordgrid.samples_per_shard=4",
            "train_ifseg.loop.steps=3", "train_ifseg.ifseg.label_size=32", "train_ifseg.batch_size=8"]
    try:
        summaries = run(compose("demo", [f"output_root={tmp_path / 'ray'}", "executor=ray", "ray.num_cpus=2", *tiny,
                                         "train_ifseg.resources.num_workers=2",
                                         "train_ifseg.resources.cpus_per_worker=0.5"]))
    finally:
        ray.shutdown()
    assert summaries[-1].status == "ran"
    assert open_stage(str(tmp_path / "ray" / "train_ifseg")).manifest["final_log"]["step"] == 3
    run(compose("demo", [f"output_root={tmp_path / 'local'}", "executor=local", *tiny]))
    ddp = read_model(open_stage(str(tmp_path / "ray" / "train_ifseg")))["trainable"]
    local = read_model(open_stage(str(tmp_path / "local" / "train_ifseg")))["trainable"]
    assert ddp.keys() == local.keys()
    for name, tensor in local.items():  # equal up to float summation order; a rank training alone would differ
        assert torch.allclose(ddp[name], tensor, atol=1e-5, rtol=1e-4), name
