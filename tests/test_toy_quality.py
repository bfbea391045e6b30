"""A reduced demo on the toy world must stay far above its random-weights floor (issues 6 and 11 regression guard).

Runs pseudo-labelling (CLIP + SAM, the demo's `dense: sclip`) on 24 toy train scenes, the alignment module trained
on those pseudo-labels (the demo's `train_align`, fewer steps), image-free IFSeg on word grids (the demo's
`train_ifseg`, fewer grids and steps), and on toy val scenes the training-free baseline once per dense backend
(`ClipConfig.dense`) plus the alignment module, IFSeg, IFSeg self-trained (the demo's `selftrain` +
`train_ifseg_st`, fewer steps) and ZegCLIP inductive and transductive (the demo's `train_zegclip` and
`train_zegclip_st`, on the pseudolabel shards' seen GT), all in one eval stage; twice — with the committed toy
checkpoints and with random weights (CLIP, SAM and DINOv2) — and compares the quality each run reports. 24 train
scenes, not fewer: at 10 ZegCLIP transductive showed no margin (measured 2026-12-02: 6.0 vs floor 6.3 mIoU; at 24:
15.8 vs 2.6). Not guarded: the unseen classes of self-training, and the alignment module's quality on the trained
toy DINOv2 against a random one (no margin to bound; checked instead: it runs on the committed weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.data.vocab import load_vocab
from pipeline.models.dinov2 import Dinov2, Dinov2Config
from pipeline.predict.load_trained import load_trained
from pipeline.run import compose, run
from pipeline.shards import open_stage

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CLIP_WEIGHTS = REPO / "assets" / "models" / "toy_clip.pt"
DINOV2_WEIGHTS = REPO / "assets" / "models" / "toy_dinov2.pt"
BACKENDS = ("maskclip", "sclip", "clearclip", "naclip", "proxyclip")
# Required margin (mIoU points) of each backend's baseline over its own random-weights floor on these 10 val scenes.
# Measured 2026-12-02 (trained / floor mIoU): maskclip 18.6 / 3.2, sclip 18.5 / 3.4, clearclip 20.2 / 4.7,
# naclip 23.5 / 4.3, proxyclip (trained toy DINOv2 as proxy; random-init for the floor) 20.4 / 6.0; each bound is
# about half the measured margin.
MARGINS = {"maskclip": 7.0, "sclip": 7.0, "clearclip": 7.0, "naclip": 9.0, "proxyclip": 7.0}


def baseline_methods(trained: bool) -> str:
    """One eval method per dense backend, all on the toy CLIP (random weights for the floor; ProxyCLIP's proxy is the
    trained toy DINOv2, random-init for the floor)."""
    weights = CLIP_WEIGHTS if trained else "null"
    proxy_weights = DINOV2_WEIGHTS if trained else "null"
    entries = []
    for backend in BACKENDS:
        proxy = f",proxy:{{name:toy,weights:{proxy_weights}}}" if backend == "proxyclip" else ""
        clip = f"{{model_name:toy-vit,pretrained:{weights},dense:{backend}{proxy}}}"
        entries.append(f"{{name:{backend},kind:maskclip,templates:maskclip85,clip:{clip}}}")
    entries += ["{name:align,kind:trained,input:align,knn:false}", "{name:ifseg,kind:trained,input:ifseg,knn:false}"]
    if trained:  # self-training's floor would copy the same seen GT: it is compared with its init instead
        entries += ["{name:ifseg_selftrain,kind:trained,input:ifseg_st,knn:false}"]
    entries += ["{name:zegclip,kind:trained,input:zegclip,protocol:zegclip,"
                "protocol_overrides:{short_side:128,mode:whole}}",
                "{name:zegclip_transductive,kind:trained,input:zegclip_st,protocol:zegclip,"
                "protocol_overrides:{short_side:128,mode:whole}}"]
    return "[" + ",".join(entries) + "]"


def reduced_demo(root: Path, trained: bool) -> tuple[dict, dict]:
    selftraining = ["selftrain", "train_ifseg_st"] if trained else []  # the floor run skips them (see baseline_methods)
    stages = ["wordgrid", "train_ifseg", *selftraining, "pseudolabel", "train_align", "train_zegclip",
              "train_zegclip_st", "quality_eval"]
    inputs = {"align": "train_align", "ifseg": "train_ifseg", "zegclip": "train_zegclip",
              "zegclip_st": "train_zegclip_st", **({"ifseg_st": "train_ifseg_st"} if trained else {})}
    overrides = [
        f"output_root={root}", "executor=local", f"stages=[{','.join(stages)}]",
        "toy.train_images=24", "train_align.loop.steps=60", "train_align.resources.backend=local",
        "wordgrid.num_samples=480", "wordgrid.samples_per_shard=240", "train_ifseg.loop.steps=150",
        "train_ifseg.resources.backend=local", "train_ifseg_st.loop.steps=50", "train_ifseg_st.resources.backend=local",
        "train_zegclip.loop.steps=150", "train_zegclip.resources.backend=local",
        "train_zegclip_st.loop.steps=150", "train_zegclip_st.resources.backend=local",
        "+stage@quality_eval=eval", "+quality_eval.data={kind:toyworld,split:val,num_images:10,size:128}",
        "++quality_eval.inputs={" + ",".join(f"{k}:{v}" for k, v in inputs.items()) + "}",
        "+quality_eval.protocol_overrides.short_side=128", "quality_eval.num_report_samples=0",
        f"quality_eval.methods={baseline_methods(trained)}",
        "pseudolabel.samples_per_shard=10",
    ]
    if not trained:
        overrides += ["models.clip.pretrained=null", "models.sam.checkpoint=null", "models.dinov2.weights=null"]
    run(compose("demo", overrides))
    pseudo = open_stage(str(root / "pseudolabel"))
    quality = json.loads(Path(pseudo.path, "pseudolabel_quality.json").read_text())
    metrics = json.loads(Path(open_stage(str(root / "quality_eval")).path, "metrics.json").read_text())
    return quality, metrics["methods"]


def align_backbone_state(root: Path) -> dict:
    """The DINOv2 weights under the alignment module that the eval stage rebuilt from `train_align`'s model.pt."""
    predictor = load_trained(open_stage(str(root / "train_align")), load_vocab("toy"))
    return predictor.dinov2.model.state_dict()


@pytest.mark.skipif(not CLIP_WEIGHTS.exists(), reason="toy checkpoints not present")
def test_trained_toy_models_stay_far_above_the_random_floor(tmp_path):
    trained_quality, trained_methods = reduced_demo(tmp_path / "trained", trained=True)
    floor_quality, floor_methods = reduced_demo(tmp_path / "floor", trained=False)
    # The demo's pseudo-labels (dense: sclip) on 24 toy train scenes, measured 2026-12-02 (trained / floor):
    # coverage 38.4 / 19.1 %, mIoU on labelled pixels 15.3 / 0.7, with unlabelled pixels counted wrong 6.7 / 0.5.
    trained_pl, floor_pl = trained_quality["merged"], floor_quality["merged"]
    assert trained_pl["mIoU_labelled"] > floor_pl["mIoU_labelled"] + 7, (trained_pl, floor_pl)
    assert trained_pl["mIoU_unlabelled_as_wrong"] > floor_pl["mIoU_unlabelled_as_wrong"] + 3, (trained_pl, floor_pl)
    assert trained_pl["coverage"] > floor_pl["coverage"] + 10, (trained_pl, floor_pl)
    trained_maskclip, floor_maskclip = trained_methods["maskclip"], floor_methods["maskclip"]
    assert trained_maskclip["pAcc"] > floor_maskclip["pAcc"] + 10
    for backend in BACKENDS:
        trained_miou, floor_miou = trained_methods[backend]["mIoU"], floor_methods[backend]["mIoU"]
        assert trained_miou > floor_miou + MARGINS[backend], (backend, trained_miou, floor_miou)
    # The alignment module (the demo's text_ce, 60 steps on the 24 pseudo-labelled scenes; its floor also has a
    # random-init DINOv2), measured 2026-12-02 (trained / floor): mIoU 6.3 / 1.8, pAcc 40.2 / 20.9.
    trained_align, floor_align = trained_methods["align"], floor_methods["align"]
    assert trained_align["mIoU"] > floor_align["mIoU"] + 2.5, (trained_align, floor_align)
    assert trained_align["pAcc"] > floor_align["pAcc"] + 10, (trained_align, floor_align)
    # It reads the committed toy DINOv2 (issue 11), not a random init: a quality margin against a random DINOv2 alone
    # would test noise (README, alignment section: +0.2 to +0.9 mIoU even on ground-truth labels at this size).
    committed = Dinov2.build(Dinov2Config(name="toy", weights=str(DINOV2_WEIGHTS))).model.state_dict()
    trained_backbone = align_backbone_state(tmp_path / "trained")
    floor_backbone = align_backbone_state(tmp_path / "floor")
    assert committed.keys() == trained_backbone.keys()
    assert all(torch.equal(committed[k], trained_backbone[k]) for k in committed)
    assert not torch.equal(committed["embeddings.patch_embeddings.projection.weight"],
                           floor_backbone["embeddings.patch_embeddings.projection.weight"])
    # Image-free IFSeg (the demo's decoder, 150 steps on 480 word grids; half the demo's steps), measured 2026-12-02
    # (trained / floor): mIoU 7.8 / 1.3, pAcc 28.7 / 12.9 (at 100 steps the margin was only 2.2 mIoU).
    trained_ifseg, floor_ifseg = trained_methods["ifseg"], floor_methods["ifseg"]
    assert trained_ifseg["mIoU"] > floor_ifseg["mIoU"] + 3, (trained_ifseg, floor_ifseg)
    assert trained_ifseg["pAcc"] > floor_ifseg["pAcc"] + 8, (trained_ifseg, floor_ifseg)
    # ZegCLIP (the demo's toy-budget recipe, 150 steps at 64 px on the 24 scenes' seen GT; transductive: the second
    # half also on unseen-class pseudo-labels), measured 2026-12-02 (trained / floor): inductive mIoU 11.1 / 0.4,
    # pAcc 43.1 / 4.0 (on 10 scenes 5.9 / 0.6); transductive mIoU 15.8 / 2.6, pAcc 58.9 / 31.7.
    for name in ("zegclip", "zegclip_transductive"):
        trained_zegclip, floor_zegclip = trained_methods[name], floor_methods[name]
        assert trained_zegclip["mIoU"] > floor_zegclip["mIoU"] + 5, (name, trained_zegclip, floor_zegclip)
        assert trained_zegclip["pAcc"] > floor_zegclip["pAcc"] + 13, (name, trained_zegclip, floor_zegclip)
    # IFSeg self-training (maskclip_plus: seen-GT pixels keep their GT, the init model labels unseen-GT pixels; 50
    # steps). Its floor is not a random floor: it copies the same seen GT (measured 28.3 mIoU vs 30.4 trained), so
    # the guard is on what self-training adds to its image-free init in the trained run: mIoU(S) 40.4 vs 10.0.
    # Unseen classes are not guarded: mIoU(U) after self-training 0.2 (floor 3.8), the image-free init's 1.0.
    selftrained = trained_methods["ifseg_selftrain"]
    assert selftrained["mIoU(S)"] > trained_ifseg["mIoU(S)"] + 14, (selftrained, trained_ifseg)
    assert selftrained["mIoU"] > trained_ifseg["mIoU"] + 10, (selftrained, trained_ifseg)
    # NACLIP's neighbourhood attention beats MaskCLIP's value path on pixel accuracy (measured 66.1 vs 47.4)
    assert trained_methods["naclip"]["pAcc"] > trained_maskclip["pAcc"] + 9
