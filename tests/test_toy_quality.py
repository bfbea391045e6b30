"""A reduced demo on the toy world must stay far above its random-weights floor (issue 6 regression guard).

Runs pseudo-labelling (CLIP + SAM) on toy train scenes and the MaskCLIP baseline on toy val scenes twice — with the
committed toy checkpoints and with random weights — and compares the quality each run reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.run import compose, run
from pipeline.shards import open_stage

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CLIP_WEIGHTS = REPO / "assets" / "models" / "toy_clip.pt"


def reduced_demo(root: Path, trained: bool) -> tuple[dict, dict]:
    clip = f"{{model_name:toy-vit,pretrained:{CLIP_WEIGHTS if trained else 'null'}}}"
    overrides = [
        f"output_root={root}", "executor=local", "stages=[pseudolabel,quality_eval]", "toy.train_images=10",
        "+stage@quality_eval=eval", "+quality_eval.data={kind:toyworld,split:val,num_images:10,size:128}",
        "+quality_eval.protocol_overrides.short_side=128", "quality_eval.num_report_samples=0",
        f"quality_eval.methods=[{{name:maskclip,kind:maskclip,templates:maskclip85,clip:{clip}}}]",
        "pseudolabel.samples_per_shard=10",
    ]
    if not trained:
        overrides += ["models.clip.pretrained=null", "models.sam.checkpoint=null"]
    run(compose("demo", overrides))
    pseudo = open_stage(str(root / "pseudolabel"))
    quality = json.loads(Path(pseudo.path, "pseudolabel_quality.json").read_text())
    metrics = json.loads(Path(open_stage(str(root / "quality_eval")).path, "metrics.json").read_text())
    return quality, metrics["methods"]["maskclip"]


@pytest.mark.skipif(not CLIP_WEIGHTS.exists(), reason="toy checkpoints not present")
def test_trained_toy_models_stay_far_above_the_random_floor(tmp_path):
    trained_quality, trained_maskclip = reduced_demo(tmp_path / "trained", trained=True)
    floor_quality, floor_maskclip = reduced_demo(tmp_path / "floor", trained=False)
    trained_pl = trained_quality["merged"]["mIoU_unlabelled_as_wrong"]
    floor_pl = floor_quality["merged"]["mIoU_unlabelled_as_wrong"]
    assert trained_pl > floor_pl + 5, (trained_pl, floor_pl)
    assert trained_quality["merged"]["coverage"] > floor_quality["merged"]["coverage"]
    assert trained_maskclip["mIoU"] > floor_maskclip["mIoU"] + 5, (trained_maskclip["mIoU"], floor_maskclip["mIoU"])
    assert trained_maskclip["pAcc"] > floor_maskclip["pAcc"] + 10
