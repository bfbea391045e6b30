"""The pseudolabel stage with tiny random-weight CLIP/SAM: its typed config (typos fail on the driver naming the
key, on the CLI too), sample contents, modes, bad images, checkpoints, counting, and the stage end to end on real
CamVid images through the runner."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import ConfigError
from pipeline.executor import run_batch
from pipeline.models.configs import AmgConfig, ClipConfig, SamConfig
from pipeline.sample_files import rle_to_mask
from pipeline.stage import StageContext
from pseudolabel.fixtures import TINY, make_stage
from stages.pseudolabel import PseudoLabelConfig, PseudoLabelStage
from stages.pseudolabel.steps import LabelledMask, merge

REPO = Path(__file__).resolve().parents[3]


def ready_stage(tmp_path: Path, **overrides: object) -> PseudoLabelStage:
    stage = make_stage(tmp_path, **overrides)
    stage.setup()
    return stage


def run_items(stage: PseudoLabelStage, items: list) -> list:
    return run_batch(stage, [stage.load(item) for item in items])


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ the typed config

@pytest.mark.parametrize(("override", "message"), [
    ({"mode": "stage13"}, "pl.mode='stage13'"), ({"labeler": "knn"}, "pl.labeler='knn'"),
    ({"merge_policy": "union"}, "pl.merge_policy='union'"), ({"image_format": "gif"}, "pl.image_format"),
    ({"top_k": 0}, "pl.top_k=0"), ({"min_mask_area": -1}, "pl.min_mask_area=-1"), ({"data": {}}, "pl.data.kind"),
    ({"prompt_templates": "nope"}, "pl.prompt_templates"), ({"vocab": "nope"}, "pl.vocab='nope'"),
    ({"data": {"kind": "toyworld", "vocab": "camvid_11"}}, "pl.data"),
    ({"topk": 3}, r"pl\.topk: unknown config key; .*'top_k'"),
])
def test_bad_config_fails_before_compute_naming_the_key(tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_stage(tmp_path, **override)


@pytest.mark.parametrize(("section", "typo", "valid"), [
    ("clip", "modelname", "model_name"), ("sam", "chekpoint", "checkpoint"),
    ("amg", "points_per_sid", "points_per_side"),
])
def test_a_typo_in_a_model_section_names_the_full_key(tmp_path: Path, section: str, typo: str, valid: str) -> None:
    message = rf"^pl\.{section}\.{typo}: unknown config key; valid keys of pl\.{section}: .*'{valid}'"
    with pytest.raises(ConfigError, match=message):
        make_stage(tmp_path, **{section: {**TINY.get(section, {}), typo: 1}})


@pytest.mark.parametrize(("section", "values", "message"), [
    ("clip", {"precision": "fp64"}, r"pl\.clip\.precision='fp64': expected one of \['fp32', 'bf16', 'fp16'\]"),
    ("sam", {"model_type": "vit_x"}, r"pl\.sam\.model_type='vit_x'"),
    ("amg", {"points_per_side": "many"}, r"pl\.amg\.points_per_side='many': expected int"),
])
def test_a_bad_model_value_names_the_full_key(tmp_path: Path, section: str, values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_stage(tmp_path, **{section: {**TINY.get(section, {}), **values}})


def test_model_sections_are_the_model_dataclasses_with_yaml_values_kept(tmp_path: Path) -> None:
    cfg = make_stage(tmp_path, amg={"points_per_side": 3, "stability_score_offset": 1}).cfg
    assert isinstance(cfg.clip, ClipConfig) and isinstance(cfg.sam, SamConfig) and isinstance(cfg.amg, AmgConfig)
    assert cfg.clip == ClipConfig(model_name="toy-vit") and cfg.sam == SamConfig(model_type="toy")
    assert cfg.amg == AmgConfig(points_per_side=3) and cfg.amg.stability_score_offset == 1  # given values unchanged
    assert PseudoLabelConfig().sam == SamConfig(model_type="vit_h")  # Seifi et al.'s SAM when nothing is said


def test_a_model_key_typo_exits_2_on_the_cli_before_any_work(tmp_path: Path) -> None:
    """Hydra refuses a new key without `+`; with `+` the key reaches the stage's typed config, which refuses it."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for override, named in (("+pseudolabel.sam.chekpoint=x", "pseudolabel.sam.chekpoint: unknown config key"),
                            ("pseudolabel.sam.chekpoint=x", "pseudolabel.sam.chekpoint")):
        process = subprocess.run([sys.executable, "-m", "pipeline.run", "conf=demo", "stages=[pseudolabel]",
                                  f"output_root={out}", override], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=120)
        assert process.returncode == 2, process.stderr
        assert named in process.stderr
    assert not out.exists()


def test_missing_checkpoint_fails_in_identities_naming_the_key(tmp_path: Path) -> None:
    stage = make_stage(tmp_path, sam={"model_type": "toy", "checkpoint": str(tmp_path / "missing.pth")})
    with pytest.raises(ConfigError, match=r"^pl\.sam\.checkpoint: .*missing.pth does not exist"):
        stage.identities()


def test_stage_yaml_mirrors_the_config_fields() -> None:
    values = yaml.safe_load((REPO / "conf" / "stage" / "pseudolabel.yaml").read_text())
    fields = {f.name for f in dataclasses.fields(PseudoLabelConfig)}
    assert set(values) - {"stage", "inputs"} == fields
    defaults = PseudoLabelConfig()
    for name in fields - {"vocab", "resources"}:
        default = getattr(defaults, name)
        expected = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        assert values[name] == pytest.approx(expected), name  # every model knob listed, defaults unchanged


def test_pin_memory_is_a_resource_but_switches_that_change_rounding_enter_the_fingerprint() -> None:
    """sam.pin_memory only page-locks a copy (no value changes): outside the fingerprint. sdpa/compile/precision and
    the call-size knobs change float rounding, so they stay in (pipeline.fingerprint.RESOURCE_KEYS)."""
    from pipeline.fingerprint import stage_fingerprint

    values = yaml.safe_load((REPO / "conf" / "stage" / "pseudolabel.yaml").read_text())

    def fingerprint(section: str, **changes: object) -> str:
        config = {**values, section: {**values[section], **changes}}
        return stage_fingerprint("pseudolabel", "1", config, {}, {"sam": "random-init"})

    base = fingerprint("sam")
    assert fingerprint("sam", pin_memory=not values["sam"]["pin_memory"]) == base
    for section, key, value in (("sam", "sdpa", True), ("sam", "compile", True), ("sam", "precision", "bf16"),
                                ("sam", "shared_image_decoder", not values["sam"]["shared_image_decoder"]),
                                ("sam", "prompt_batch_size", 3), ("clip", "compile", True),
                                ("clip", "image_batch_size", 5)):
        assert fingerprint(section, **{key: value}) != base, key


# ------------------------------------------------------------------------------------------ the stage

def test_crop_off_the_patch_grid_fails_at_setup_naming_the_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pl.crop=60 and .stride=32 must be multiples"):
        ready_stage(tmp_path, crop=60)


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_sample_files_are_consistent_label_masks_gt_and_provenance(tmp_path: Path) -> None:
    stage = ready_stage(tmp_path, merge_policy="highest_score")
    refs = stage.adapter.list_items()
    outputs = run_items(stage, refs)
    assert [o.key for o in outputs] == [r.key for r in refs] and all(o.ok for o in outputs)
    for ref, out in zip(refs, outputs, strict=True):
        label = _decode_png(out.files["label.png"])
        masks = json.loads(out.files["masks.json"])
        meta = json.loads(out.files["json"])
        assert label.dtype == np.uint8 and label.shape == (64, 64)
        rebuilt = merge([LabelledMask(rle_to_mask(m["segmentation"]), m["category_id"], m["score"], m["producer"])
                         for m in masks], [], (64, 64), "highest_score")
        np.testing.assert_array_equal(rebuilt, label)  # the label map is exactly the stored masks, merged
        np.testing.assert_array_equal(_decode_png(out.files["gt.png"]), stage.adapter.load(ref).label)
        assert {m["producer"] for m in masks} <= {"stage11", "stage12"}
        assert all(m["category_id"] in meta["present_classes"] for m in masks)
        assert meta["models"] == {"clip": stage.clip.identity, "sam": stage.sam.identity} == {
            k: v for k, v in stage.identities().items() if k != "vocab"}
        assert meta["schema"] == "pseudolabel/1" and meta["config"]["merge_policy"] == "highest_score"
        assert _decode_png(out.files["jpg"]).shape == (64, 64, 3)
    quality = stage.end_shard()["quality"]
    assert set(quality) == {"stage11", "stage12", "merged"}
    assert sum(map(sum, quality["merged"]["matrix"])) == 3 * 64 * 64 - sum(
        int((stage.adapter.load(r).label == 255).sum()) for r in refs)


def test_modes_choose_the_producers_and_png_or_no_image(tmp_path: Path) -> None:
    refs = ready_stage(tmp_path).adapter.list_items()[:1]
    only11 = run_items(ready_stage(tmp_path, mode="stage11", image_format="none"), refs)[0]
    only12 = run_items(ready_stage(tmp_path, mode="stage12", image_format="png", keep_ground_truth=False), refs)[0]
    assert {m["producer"] for m in json.loads(only11.files["masks.json"])} <= {"stage11"}
    assert {m["producer"] for m in json.loads(only12.files["masks.json"])} <= {"stage12"}
    assert "jpg" not in only11.files and json.loads(only11.files["json"])["source"].startswith("toyworld://")
    assert "png" in only12.files and "gt.png" not in only12.files


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_bad_images_become_failed_rows_and_leave_good_ones_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    good = _image(40, 56, 5)
    jpeg = _encode(Image.fromarray(good), "JPEG")
    files = {"a_good.png": _encode(Image.fromarray(good)), "b_zero.jpg": b"", "c_truncated.jpg": jpeg[:len(jpeg) // 2],
             "d_corrupt.png": bytes(range(256)) * 8, "e_huge.png": _png_header_only(20000, 20000),
             "f_cmyk.jpg": _encode(Image.fromarray(good).convert("CMYK"), "JPEG"),
             "g_16bit.png": _encode(Image.fromarray(good[:, :, 0].astype(np.uint16) * 257).convert("I;16")),
             "h_gray.png": _encode(Image.fromarray(good[:, :, 0]))}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    stage = ready_stage(tmp_path, data={"kind": "folder", "root": str(folder)})
    refs = stage.adapter.list_items()
    outputs = run_items(stage, refs)
    errors = {ref.source.rsplit("/", 1)[-1]: out.error for ref, out in zip(refs, outputs, strict=True)}
    assert errors["b_zero.jpg"] == "zero-byte file" and errors["c_truncated.jpg"] == "truncated image"
    assert "corrupt" in errors["d_corrupt.png"] and "too large" in errors["e_huge.png"]
    converted = [name for name in ("f_cmyk.jpg", "g_16bit.png", "h_gray.png") if errors[name] is None]
    assert converted == ["f_cmyk.jpg", "g_16bit.png", "h_gray.png"]  # the data layer converts these, with a note
    for name, out in zip(errors, outputs, strict=True):
        if name in converted:
            assert json.loads(out.files["json"])["notes"][0].startswith("converted from")
    alone = run_items(stage, refs[:1])[0]
    assert errors["a_good.png"] is None
    assert alone.files == outputs[0].files  # batch_invariant: the bad neighbours change no byte of the good image


def test_checkpoint_files_load_into_the_stage_and_enter_its_identities(tmp_path: Path) -> None:
    from pipeline.models.checkpoints import CheckpointMismatchError

    base = ready_stage(tmp_path)
    clip_path, sam_path = tmp_path / "toy_clip.pt", tmp_path / "toy_sam.pth"
    torch.save({k: v.clone() + 0.5 for k, v in base.clip.model.state_dict().items()}, clip_path)
    torch.save({k: v.clone() + 0.5 for k, v in base.sam.model.state_dict().items()}, sam_path)
    stage = ready_stage(tmp_path, clip={"model_name": "toy-vit", "pretrained": str(clip_path)},
                        sam={"model_type": "toy", "checkpoint": str(sam_path)})
    identities = stage.identities()
    assert identities["clip"].startswith("open_clip:toy-vit@sha256:")
    assert identities["sam"].startswith("sam:toy@sha256:")
    assert identities["clip"] == stage.clip.identity and identities["sam"] == stage.sam.identity
    for model, path in ((stage.clip.model, clip_path), (stage.sam.model, sam_path)):
        saved = torch.load(path, weights_only=True)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, saved[name])
    wrong = PseudoLabelStage(StageContext(node="pl", seed=0, config={
        **TINY, "data": {"kind": "toyworld"}, "clip": {"model_name": "toy-vit", "pretrained": str(sam_path)}}))
    with pytest.raises(CheckpointMismatchError):
        wrong.setup()


def test_stage_end_to_end_on_camvid_through_the_runner(tmp_path: Path, shared_data: Path) -> None:
    from pipeline.run import compose, run

    root = tmp_path / "camvid"
    for folder in ("val", "valannot"):  # two images, linked (never copied) from the shared data
        (root / folder).mkdir(parents=True)
        for name in sorted(os.listdir(shared_data / "camvid" / folder))[:2]:
            (root / folder / name).symlink_to(shared_data / "camvid" / folder / name)
    cfg = compose("demo", [f"output_root={tmp_path / 'out'}", "executor=local", "stages=[pl]"])
    cfg["pl"] = {**TINY, "stage": "pseudolabel", "inputs": {}, "vocab": "camvid_11", "samples_per_shard": 1,
                 "data": {"kind": "camvid", "root": str(root), "split": "val"}}
    summary, = run(cfg)
    assert (summary.node, summary.status, summary.samples, summary.failed, summary.shards) == ("pl", "ran", 2, 0, 2)
    out = next((tmp_path / "out" / "pl").glob("*/manifest.json")).parent
    manifest = json.loads((out / "manifest.json").read_text())
    quality = json.loads((out / "pseudolabel_quality.json").read_text())
    assert manifest["quality"]["merged"]["coverage"] == pytest.approx(quality["merged"]["coverage"])
    assert set(quality) >= {"stage11", "stage12", "merged"} and manifest["schema"] == "pseudolabel/1"
    assert quality["merged"]["num_valid_pixels"] > 0.9 * 2 * 360 * 480
    with tarfile.open(out / "000000.tar") as tar:
        names = tar.getnames()
        gt = _decode_png(tar.extractfile(next(n for n in names if n.endswith(".gt.png"))).read())
    assert sorted(n.split(".", 1)[1] for n in names) == ["gt.png", "jpg", "json", "label.png", "masks.json"]
    assert gt.shape == (360, 480) and set(np.unique(gt)) <= set(range(11)) | {255}
    assert [s.status for s in run(cfg)] == ["up to date"]


def test_a_failing_image_fails_alone_and_counters_count_each_good_image_once(tmp_path: Path) -> None:
    from pipeline.executor import run_shard

    stage = ready_stage(tmp_path, labeler="crop")
    plan = stage.plan()[0]
    bad_key = plan.items[1].key
    original = stage._pseudo_label

    def flaky(record: object, *args: object) -> object:
        if record.key == bad_key:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(record, *args)

    stage._pseudo_label = flaky
    done = run_shard(stage, plan, batch_size=3)
    assert (done.count, done.failed) == (2, 1)
    with tarfile.open(tmp_path / "000000.tar") as tar:
        masks = [json.loads(tar.extractfile(n).read()) for n in tar.getnames() if n.endswith(".masks.json")]
    assert done.extra["num_masks"] == {p: sum(m["producer"] == p for ms in masks for m in ms)
                                       for p in ("stage11", "stage12")}
    good = [stage.adapter.load(ref).label for ref in plan.items if ref.key != bad_key]
    counted = sum(map(sum, done.extra["quality"]["merged"]["matrix"]))
    assert counted == sum(int((label != 255).sum()) for label in good)


def test_shard_bytes_do_not_depend_on_the_batch_size(tmp_path: Path) -> None:
    """resources.batch_size is outside the fingerprint, so batch 1 and batch 8 must write the same tar bytes."""
    from pipeline.executor import run_shard

    tars = {}
    for batch_size in (1, 8):
        stage = ready_stage(tmp_path / str(batch_size), num_images=8,
                            amg={"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
        done = run_shard(stage, stage.plan()[0], batch_size=batch_size)
        assert (done.count, done.failed) == (8, 0)
        tars[batch_size] = (tmp_path / str(batch_size) / "000000.tar").read_bytes()
    with tarfile.open(tmp_path / "1" / "000000.tar") as tar:
        masks = [json.loads(tar.extractfile(n).read()) for n in tar.getnames() if n.endswith(".masks.json")]
    assert sum(map(len, masks)) > 8  # the comparison covers SAM's scores of many masks
    assert tars[1] == tars[8]
