"""Weight resolution, identities and loading of checkpoints saved exactly as the released files are laid out."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import fsspec
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.models.checkpoints import (
    CheckpointMismatchError,
    check_state_dict,
    load_state_dict,
    resolve_weights,
    weights_identity,
)
from pipeline.models.clip import Clip, ClipConfig
from pipeline.models.dinov2 import Dinov2, Dinov2Config
from pipeline.models.sam import Sam, SamConfig, build_sam_architecture


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key


def _save(state: dict[str, torch.Tensor], path: Path, layout: str) -> None:
    """Write `state` in one of the on-disk layouts real checkpoints use."""
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "ddp_state_dict":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    elif layout == "model_wrapper":
        torch.save({"model": state, "optimizer": {}}, path)
    else:
        torch.save(state, path)


# ---------------------------------------------------------------- references and identities


def test_resolve_weights_passes_none_and_tags_and_fails_on_missing_paths(tmp_path: Path) -> None:
    assert resolve_weights(None) is None
    assert resolve_weights("openai") == "openai"
    hub = "hf-hub:timm/vit_base_patch16_clip_224.openai"
    assert resolve_weights(hub) == hub
    with pytest.raises(FileNotFoundError, match=re.escape("clip.pretrained: /x/y.pt does not exist")):
        resolve_weights("/x/y.pt", key="clip.pretrained")
    with pytest.raises(FileNotFoundError, match="sam.checkpoint"):
        resolve_weights("sam_vit_b.pth", key="sam.checkpoint")  # looks like a file, so not a hub tag
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"abc")
    assert resolve_weights(str(weights)) == str(weights)
    assert resolve_weights(f"file://{weights}") == str(weights)


def test_resolve_weights_copies_urls_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGETL_CACHE", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    memory.pipe("/segetl-test/ViT-B-16.pt", b"weights-bytes")
    url = "memory://segetl-test/ViT-B-16.pt"
    local = resolve_weights(url, key="clip.pretrained")
    assert Path(local).read_bytes() == b"weights-bytes"
    assert Path(local).is_relative_to(tmp_path / "cache") and Path(local).name == "ViT-B-16.pt"
    memory.rm("/segetl-test/ViT-B-16.pt")
    assert resolve_weights(url) == local  # served from the cache, no second copy
    assert weights_identity(url) == "sha256:" + hashlib.sha256(b"weights-bytes").hexdigest()
    with pytest.raises(FileNotFoundError, match="clip.pretrained: memory://segetl-test/missing.pt"):
        resolve_weights("memory://segetl-test/missing.pt", key="clip.pretrained")


def test_weights_identity_hashes_once_per_size_and_mtime(tmp_path: Path) -> None:
    assert weights_identity(None) == "random-init"
    assert weights_identity("laion2b_s34b_b88k") == "tag:laion2b_s34b_b88k"
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"0123456789")
    expected = "sha256:" + hashlib.sha256(b"0123456789").hexdigest()
    assert weights_identity(str(weights)) == expected
    sidecar = tmp_path / "w.bin.sha256"
    cached = json.loads(sidecar.read_text())
    assert cached["size"] == 10 and cached["sha256"] == expected.removeprefix("sha256:")
    sidecar.write_text(json.dumps({**cached, "sha256": "cached-value"}))
    assert weights_identity(str(weights)) == "sha256:cached-value"  # the sidecar is trusted while size+mtime hold
    weights.write_bytes(b"9876543210")
    os.utime(weights, ns=(cached["mtime_ns"] + 10**9, cached["mtime_ns"] + 10**9))
    assert weights_identity(str(weights)) == "sha256:" + hashlib.sha256(b"9876543210").hexdigest()


def test_directory_identity_changes_with_any_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a")
    first = weights_identity(str(tmp_path))
    assert first == weights_identity(str(tmp_path))  # sidecars written by the first call are ignored
    (tmp_path / "config.json").write_text('{"hidden_size": 1}')
    assert weights_identity(str(tmp_path)) != first


def test_check_state_dict_names_keys_and_architecture() -> None:
    model = torch.nn.Linear(2, 3)
    state = {"weight": torch.zeros(3, 3), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError) as error:
        check_state_dict(model, state, "toy linear", source="unit.weights")
    message = str(error.value)
    for part in ("toy linear", "unit.weights", "missing keys: bias", "unexpected keys: extra", "weight (checkpoint"):
        assert part in message
    check_state_dict(model, model.state_dict(), "toy linear")  # an exact fit passes silently


def test_load_state_dict_rejects_non_mappings(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(TypeError, match="state dict"):
        load_state_dict(path)


# ---------------------------------------------------------------- open_clip


@pytest.mark.parametrize(
    ("layout", "suffix"),
    [("plain", ".pt"), ("plain", ".bin"), ("safetensors", ".safetensors"), ("ddp_state_dict", ".pt"),
     ("model_wrapper", ".pth")],
)
def test_clip_checkpoint_layouts_load_identically(toy_clip: Clip, tmp_path: Path, layout: str, suffix: str) -> None:
    path = tmp_path / f"toy-vit{suffix}"
    _save(toy_clip.model.state_dict(), path, layout)
    loaded = Clip.build(ClipConfig(model_name="toy-vit", pretrained=str(path), init_seed=7))
    _assert_same_weights(loaded.model, toy_clip.model)
    assert loaded.identity.startswith("open_clip:toy-vit@sha256:")
    if layout != "model_wrapper":  # open_clip itself reads the same files (it does not unwrap {'model': ...})
        _assert_same_weights(open_clip.create_model("toy-vit", pretrained=str(path)), toy_clip.model)


def test_clip_from_a_file_does_not_log_a_random_init(toy_clip: Clip, tmp_path: Path, caplog) -> None:
    path = tmp_path / "toy-vit.pt"
    torch.save(toy_clip.model.state_dict(), path)
    with caplog.at_level("WARNING"):
        Clip.build(ClipConfig(model_name="toy-vit", pretrained=str(path)))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level("WARNING"):
        Clip.build(ClipConfig(model_name="toy-vit", pretrained=None))  # truly random: open_clip's warning stays
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_clip_wrong_architecture_fails_naming_key_and_arch(toy_clip: Clip, tmp_path: Path) -> None:
    path = tmp_path / "toy-vit.pt"
    torch.save(toy_clip.model.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"open_clip ViT-B-16.*visual\.") as error:
        Clip.build(ClipConfig(model_name="ViT-B-16", pretrained=str(path)))
    assert "clip.pretrained" in str(error.value)


def test_clip_missing_file_fails_before_building() -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("clip.pretrained: /nonexistent/ViT-B-16.pt does not exist")):
        Clip.build(ClipConfig(model_name="ViT-B-16", pretrained="/nonexistent/ViT-B-16.pt"))


# ---------------------------------------------------------------- segment_anything


def test_sam_pth_checkpoint_loads_identically(toy_sam: Sam, tmp_path: Path) -> None:
    path = tmp_path / "sam_toy.pth"
    torch.save(toy_sam.model.state_dict(), path)  # the released sam_vit_*.pth files are plain state dicts
    loaded = Sam.build(SamConfig(model_type="toy", checkpoint=str(path), init_seed=9))
    _assert_same_weights(loaded.model, toy_sam.model)
    assert loaded.identity == f"sam:toy@sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def test_sam_wrong_checkpoint_and_missing_file(toy_clip: Clip, tmp_path: Path) -> None:
    path = tmp_path / "not_sam.pth"
    torch.save(toy_clip.model.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"sam toy.*missing keys: image_encoder\."):
        Sam.build(SamConfig(model_type="toy", checkpoint=str(path)))
    with pytest.raises(FileNotFoundError, match=re.escape("sam.checkpoint: /nope/sam_vit_h_4b8939.pth does not exist")):
        Sam.build(SamConfig(model_type="vit_h", checkpoint="/nope/sam_vit_h_4b8939.pth"))


def test_toy_sam_has_the_real_vit_b_key_layout(toy_sam: Sam) -> None:
    """The toy is the real architecture: same keys as vit_b up to block indices; vit_b rejects its shapes."""
    vit_b = build_sam_architecture("vit_b")

    def layout(model: torch.nn.Module) -> set[str]:
        return {re.sub(r"\.(blocks|layers)\.\d+\.", r".\1.*.", key) for key in model.state_dict()}

    assert layout(vit_b) == layout(toy_sam.model)
    with pytest.raises(CheckpointMismatchError, match=r"sam vit_b.*image_encoder\.pos_embed \(checkpoint"):
        check_state_dict(vit_b, toy_sam.model.state_dict(), "sam vit_b")


# ---------------------------------------------------------------- DINOv2 (transformers)


def test_dinov2_save_pretrained_directory_and_single_file(tmp_path: Path) -> None:
    source = Dinov2.build(Dinov2Config(name="toy", init_seed=3))
    source.model.save_pretrained(tmp_path / "dinov2-toy")
    from_dir = Dinov2.build(Dinov2Config(name="toy", weights=str(tmp_path / "dinov2-toy")))
    _assert_same_weights(from_dir.model, source.model)
    assert from_dir.identity.startswith("dinov2:toy@sha256:")
    from_file = Dinov2.build(Dinov2Config(name="toy", weights=str(tmp_path / "dinov2-toy" / "model.safetensors")))
    _assert_same_weights(from_file.model, source.model)


def test_dinov2_mismatch_and_missing(tmp_path: Path) -> None:
    directory = tmp_path / "dinov2-toy"
    Dinov2.build(Dinov2Config(name="toy")).model.save_pretrained(directory)
    with pytest.raises(CheckpointMismatchError, match=r"dinov2 dinov2-small.*hidden_size=64"):
        Dinov2.build(Dinov2Config(name="dinov2-small", weights=str(directory)))
    state = load_file(str(directory / "model.safetensors"))
    state.pop("embeddings.cls_token")
    save_file(state, str(directory / "model.safetensors"))  # transformers alone would only warn and re-init it
    with pytest.raises(CheckpointMismatchError, match="embeddings.cls_token"):
        Dinov2.build(Dinov2Config(name="toy", weights=str(directory)))
    with pytest.raises(FileNotFoundError, match=re.escape("dinov2.weights: /nope/dinov2-large does not exist")):
        Dinov2.build(Dinov2Config(name="dinov2-large", weights="/nope/dinov2-large"))
    with pytest.raises(FileNotFoundError, match=re.escape("dinov2.weights: dinov2-base does not exist")):
        Dinov2.build(Dinov2Config(name="dinov2-base", weights="dinov2-base"))  # no hub tags outside open_clip
