"""MaskCLIP baseline predictor and the eval stage end to end through the runner with the tiny toy CLIP."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.models.clip import Clip, ClipConfig
from pipeline.predict.predictors import MaskClipPredictor, build_predictor
from pipeline.run import compose, run
from pipeline.shards import open_stage
from stages.evaluate.methods import MethodEntry


@pytest.fixture(scope="module")
def toy_clip() -> Clip:
    return Clip.build(ClipConfig(model_name="toy-vit", pretrained=None))


def test_maskclip_logits_are_scaled_cosines_of_normalised_dense_features(toy_clip):
    text = toy_clip.encode_text(["sky", "grass", "car"], ("a photo of a {}.",))
    predictor = MaskClipPredictor(toy_clip, text, logit_scale=100.0)
    pixels = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # exactly one 8 px patch
    logits = predictor.logits(pixels)
    mean = torch.tensor(toy_clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(toy_clip.std).view(1, 3, 1, 1)
    feature, _ = toy_clip.dense_features((pixels - mean) / std)  # [1, D, 1, 1], unit norm
    expected = 100.0 * (feature[0, :, 0, 0] @ torch.nn.functional.normalize(text, dim=-1).T)
    assert logits.shape == (1, 3, 8, 8)
    torch.testing.assert_close(logits[0, :, 3, 5], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, expected.view(1, 3, 1, 1).expand(1, 3, 8, 8), rtol=1e-4, atol=1e-4)


def test_maskclip_pads_with_the_clip_mean_and_crops_back(toy_clip):
    text = toy_clip.encode_text(["sky", "grass"], ("a photo of a {}.",))
    predictor = MaskClipPredictor(toy_clip, text)
    pixels = torch.rand(1, 3, 13, 21, generator=torch.Generator().manual_seed(1))
    padded = torch.tensor(toy_clip.mean).view(1, 3, 1, 1).expand(1, 3, 16, 24).clone()
    padded[:, :, :13, :21] = pixels
    logits = predictor.logits(pixels)
    assert logits.shape == (1, 2, 13, 21)
    torch.testing.assert_close(logits, predictor.logits(padded)[:, :, :13, :21], rtol=1e-4, atol=1e-3)
    assert float(logits.abs().max()) <= 100.0 + 1e-3


def test_build_predictor_rejects_labels_and_unknown_kinds():
    for kind in ("labels", "mystery"):
        with pytest.raises(ValueError, match=f"kind '{kind}' has no predictor"):
            build_predictor(MethodEntry(name="p", kind=kind, input="x"), None, {}, "cpu")


def test_maskclip_baseline_end_to_end_through_the_runner(tmp_path):
    overrides = [
        f"output_root={tmp_path}", "executor=local", "stages=[evalnode]", "+stage@evalnode=eval",
        "+evalnode.data={kind:toyworld,split:val,num_images:3,size:64}", "evalnode.samples_per_shard=2",
        "evalnode.num_report_samples=2", "+evalnode.protocol_overrides.short_side=64",
        "evalnode.methods=[{name:maskclip,kind:maskclip,clip:{model_name:toy-vit},templates:single},"
        "{name:maskclip_slide,kind:maskclip,clip:{model_name:toy-vit},templates:single,protocol:tcl,"
        "protocol_overrides:{short_side:64,crop:48,stride:24}}]",
    ]
    summary = run(compose("demo", overrides))
    assert [(s.node, s.status, s.samples, s.failed, s.shards) for s in summary] == [("evalnode", "ran", 3, 0, 2)]
    output = open_stage(str(tmp_path / "evalnode"))
    assert set(output.manifest["metrics"]) == {"maskclip", "maskclip_slide"}
    assert set(output.manifest["metrics"]["maskclip"]) >= {"mIoU", "pAcc", "mIoU(S)", "mIoU(U)", "hIoU"}
    document = json.loads((tmp_path / "evalnode" / output.fingerprint / "metrics.json").read_text())
    assert document["methods"]["maskclip_slide"]["protocol"]["mode"] == "slide"
    assert document["methods"]["maskclip_slide"]["protocol"]["crop"] == 48
    sample = next(output.samples())
    assert {"maskclip.png", "maskclip_slide.png", "json"} <= set(sample)
    assert (tmp_path / "evalnode" / output.fingerprint / "report" / "report.md").exists()
    assert [s.status for s in run(compose("demo", overrides))] == ["up to date"]
