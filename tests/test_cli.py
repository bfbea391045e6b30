"""The command line: every override the README and conf/base.yaml show works, and every bad configuration exits 2
before any work with a message naming the key and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipeline.run import compose, main

REPO = Path(__file__).resolve().parents[1]
FOLDER = {"kind": "folder", "root": "/images"}


def value_at(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, list) else cfg[part]
    return cfg


@pytest.mark.parametrize("preset, overrides, key, expected", [
    ("demo", ["output_root=s3://bucket/segetl"], "output_root", "s3://bucket/segetl"),
    ("demo", ["stages=[pseudolabel]"], "stages", ["pseudolabel"]),
    ("demo", ["force=[wordgrid]"], "force", ["wordgrid"]),
    ("demo", ["retry_failed=true"], "retry_failed", True),
    ("demo", ["seed=3"], "seed", 3),
    ("demo", ["vocab=voc_20"], "wordgrid.vocab", "voc_20"),
    ("demo", ["executor=local"], "executor", "local"),
    ("demo", ["max_failure_ratio=0.2"], "max_failure_ratio", 0.2),
    ("demo", ["dry_run=true"], "dry_run", True),
    ("demo", ["lease.wait_s=0"], "lease.wait_s", 0),
    ("demo", ["lease.stale_s=60"], "lease.stale_s", 60),
    ("demo", ["lease.heartbeat_s=5"], "lease.heartbeat_s", 5),
    ("demo", ["lease.settle_s=2"], "lease.settle_s", 2),
    ("demo", ["lease.poll_s=0.5"], "lease.poll_s", 0.5),
    ("demo", ["ray.address=auto"], "ray.address", "auto"),
    ("demo", ["ray.num_cpus=2"], "ray.num_cpus", 2),
    ("demo", ["ray.temp_dir=/tmp/ray"], "ray.temp_dir", "/tmp/ray"),
    ("demo", ["models.clip.pretrained=null"], "pseudolabel.clip.pretrained", None),
    ("demo", ["models.sam.checkpoint=null"], "pseudolabel.sam.checkpoint", None),
    ("demo", ["models.dinov2.weights=/weights/dinov2"], "models.dinov2.weights", "/weights/dinov2"),
    ("demo", ["wordgrid.max_grid_size=16"], "wordgrid.max_grid_size", 16),
    ("demo", ["pseudolabel.top_k=5"], "pseudolabel.top_k", 5),
    ("demo", ["train_ifseg.loop.steps=2000"], "train_ifseg.loop.steps", 2000),
    ("coco", ["coco_root=/data/coco_stuff164k"], "pseudolabel.data.root", "/data/coco_stuff164k"),
    ("coco", ["models.clip.pretrained=/weights/ViT-B-16.pt"], "eval.methods.0.clip.pretrained",
     "/weights/ViT-B-16.pt"),
    ("coco", ["models.sam.checkpoint=/weights/sam_vit_h_4b8939.pth"], "pseudolabel.sam.checkpoint",
     "/weights/sam_vit_h_4b8939.pth"),
    ("demo", ["pseudolabel.data={kind:folder,root:/images}"], "pseudolabel.data", FOLDER),
    ("demo", ["~pseudolabel.data", "+pseudolabel.data={kind:folder,root:/images}"], "pseudolabel.data", FOLDER),
    ("demo", ["selftrain.data={kind:coco,annotation_file:/coco/instances_val2017.json}"], "selftrain.data",
     {"kind": "coco", "annotation_file": "/coco/instances_val2017.json"}),
    ("coco", ["eval.data={kind:folder,root:s3://bucket/images}"], "eval.data",
     {"kind": "folder", "root": "s3://bucket/images"}),
])
def test_documented_overrides_compose(preset, overrides, key, expected):
    assert value_at(compose(preset, overrides), key) == expected


def images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"im{i}.jpg")
    return folder


def test_documented_commands_run(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([f"output_root={out}", "vocab=voc_20", "stages=[wordgrid]", "dry_run=true"]) == 0
    folder = images(tmp_path / "pool")
    assert main([f"output_root={out}", f"pseudolabel.data={{kind:folder,root:{folder}}}", "stages=[pseudolabel]",
                 "dry_run=true"]) == 0
    coco_json = tmp_path / "instances.json"
    coco_json.write_text(json.dumps({"images": [{"id": 1, "file_name": "im0.jpg", "height": 8, "width": 8}],
                                     "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
    assert main([f"output_root={out}", "stages=[pseudolabel]", "dry_run=true",
                 f"pseudolabel.data={{kind:coco,annotation_file:{coco_json},image_root:{folder}}}"]) == 0
    coco_root = tmp_path / "coco"
    images(coco_root / "images" / "train2017")
    (coco_root / "annotations" / "train2017").mkdir(parents=True)
    assert main(["conf=coco", f"output_root={out}", f"coco_root={coco_root}", "stages=[pseudolabel]",
                 "dry_run=true"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("would run") == 4 and printed.count("nothing written") == 4
    assert not out.exists()


def broken_preset(tmp_path: Path, monkeypatch) -> str:
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "broken.yaml").write_text("defaults:\n  - base\n  - _self_\nwordgrid: {stage: wordgrid\n  bad: [\n")
    monkeypatch.setenv("SEGETL_CONF_DIR", str(conf))
    return "conf=broken"


@pytest.mark.parametrize("argv, needles", [
    (["conf=coco", "stages=[pseudolabel]", "coco_root=/nonexistent/coco"], ["pseudolabel.data.root", "coco_root="]),
    (["stages=[pseudolabel]", "pseudolabel.data={kind:folder,root:/nonexistent/images}"],
     ["pseudolabel.data.root", "/nonexistent/images"]),
    (["stages=[wordgrid]", "wordgrid.vocab=typo"], ["wordgrid.vocab", "available"]),
    (["stages=[pseudolabel]", "pseudolabel.vocab=typo"], ["pseudolabel.vocab", "available"]),
    (["stages=[selftrain]", "selftrain.vocab=typo"], ["selftrain.vocab", "available"]),
    (["stages=[train_ifseg]", "train_ifseg.vocab=typo"], ["train_ifseg.vocab", "available"]),
    (["stages=[eval]", "eval.vocab=typo"], ["eval.vocab", "available"]),
    (["vocab=typo"], ["vocab='typo'", "available"]),
    (["BROKEN"], ["broken.yaml", "fix:"]),
    (["pseudolabel.data=foo"], ["pseudolabel.data='foo'", "pseudolabel.data={kind:folder"]),
    (["pseudolabel.data={kind:nope,root:/x}"], ["pseudolabel.data.kind='nope'", "folder"]),
    (["wordgrid.num_samples=="], ["wordgrid.num_samples", "fix: write key=value"]),
    (["pseudolabel.amg={nope:1}"], ["pseudolabel.amg", "'~pseudolabel.amg' '+pseudolabel.amg={...}'"]),
    (["pseudolabel.data.root=/x"], ["pseudolabel.data.root", "pseudolabel.data={kind:folder"]),
    (["+pseudolabel.data={kind:folder,root:/x}"], ["pseudolabel.data", "fix:", "pseudolabel.data={kind:folder"]),
    (["wordgrid.nope=1"], ["wordgrid.nope", "+wordgrid.nope="]),
    (["lease.wait_s=soon"], ["lease.wait_s", "expected float"]),
])
def test_bad_configuration_exits_2_naming_the_key_before_any_work(tmp_path, monkeypatch, capsys, argv, needles):
    argv = [broken_preset(tmp_path, monkeypatch) if arg == "BROKEN" else arg for arg in argv]
    out = tmp_path / "out"
    assert main([f"output_root={out}", "executor=local", *argv]) == 2
    err = capsys.readouterr().err
    assert all(needle in err for needle in needles), err
    assert "Traceback" not in err and not out.exists()
