"""Label outputs for the hand-over tests: the demo's real pseudolabel node (run once per session) and hand-built
`pseudolabel/1` outputs (uint16 vocabularies, failed rows, crafted tars) published like a stage publishes them."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from pipeline.data.vocab import Vocabulary
from pipeline.sample_files import encode_image, encode_label_png, mask_record, mask_to_rle
from pipeline.shards import (
    SampleOutput,
    ShardDone,
    StageOutput,
    commit_shard,
    open_stage,
    write_pointer,
    write_stage_index,
)

DEMO_PSEUDOLABEL = ["executor=local", "stages=[pseudolabel]", "toy.train_images=6", "pseudolabel.samples_per_shard=3",
                    "pseudolabel.amg.points_per_side=4"]


@pytest.fixture(scope="session")
def demo_pseudolabels(tmp_path_factory: pytest.TempPathFactory) -> StageOutput:
    """The demo preset's pseudolabel node on 6 toy-world scenes (128 px, trained toy CLIP/SAM, 2 shards)."""
    from pipeline.run import compose, run

    root = tmp_path_factory.mktemp("demo")
    run(compose("demo", [f"output_root={root}", *DEMO_PSEUDOLABEL]))
    output = open_stage(str(root / "pseudolabel"))
    assert sum(output.manifest["num_masks"].values()) > 0, "the fixture needs masks to export"
    return output


def big_vocab(num_classes: int = 900) -> Vocabulary:
    """A vocabulary over 255 classes: uint16 label maps, 65535 = ignore."""
    return Vocabulary.from_dict({"name": f"big{num_classes}", "ignore_index": 65535, "unseen": [],
                                 "classes": [{"name": f"class{i}"} for i in range(num_classes)]})


def label_sample(key: str, label: np.ndarray, vocab: Vocabulary, seed: int = 0, gt: bool = True) -> SampleOutput:
    """A `pseudolabel/1` sample: random RGB jpg, the label map, one masks.json entry per class, gt = the label."""
    image = np.random.default_rng(seed).integers(0, 256, size=(*label.shape, 3), dtype=np.uint8)
    masks = [mask_record(mask_to_rle(label == c), int(c), 0.5 + 0.01 * i, "stage11")
             for i, c in enumerate(np.unique(label)) if int(c) != vocab.ignore_index]
    files = {"jpg": encode_image(image, "jpg"), "label.png": encode_label_png(label),
             "masks.json": json.dumps(masks).encode(),
             "json": json.dumps({"schema": "pseudolabel/1", "key": key, "source": f"test://{key}"}).encode()}
    if gt:
        files["gt.png"] = encode_label_png(label)
    return SampleOutput(key, files, source=f"test://{key}")


def publish(root: str, node: str, vocab: Vocabulary, shards: Sequence[Sequence[SampleOutput]],
            fingerprint: str = "fp0", schema: str = "pseudolabel/1", config: dict[str, Any] | None = None) -> str:
    """Commit `shards` and the stage index the way `pipeline.run` does; returns the node directory URL."""
    fs, path = fsspec.core.url_to_fs(root)
    stage_dir = f"{path}/{node}/{fingerprint}"
    done = [commit_shard(fs, stage_dir, i, list(samples), fingerprint) for i, samples in enumerate(shards)]
    write_stage_index(fs, stage_dir, manifest(node, fingerprint, schema, vocab, done, config or {}), done)
    write_pointer(fs, f"{path}/{node}", fingerprint)
    return f"{root.rstrip('/')}/{node}"


def manifest(node: str, fingerprint: str, schema: str, vocab: Vocabulary, done: Sequence[ShardDone],
             config: dict[str, Any]) -> dict[str, Any]:
    return {"node": node, "kind": node, "fingerprint": fingerprint, "schema": schema, "code_version": "1",
            "config": config, "identities": {}, "upstream": {}, "vocab": vocab.to_dict(),
            "shards": [{"name": f"{d.shard}.tar", "count": d.count, "failed": d.failed, "sha256": d.sha256,
                        "bytes": d.bytes} for d in done],
            "num_samples": sum(d.count for d in done), "num_failed": sum(d.failed for d in done)}


def raw_tar(members: Sequence[tuple[str, bytes | None, str]]) -> bytes:
    """Tar bytes from (name, data, kind): kind "file", "symlink" or "hardlink" (data then names the target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = data.decode()
                tar.addfile(info)
    return buffer.getvalue()


def replace_shard(node_dir: str, index: int, data: bytes) -> None:
    """Overwrite shard `index` of a published output with `data`, re-recording its size and sha256 so the crafted
    tar passes the integrity checks and only the member checks can refuse it."""
    import hashlib

    output = open_stage(node_dir)
    tar = Path(output.path) / f"{index:06d}.tar"
    tar.write_bytes(data)
    manifest_path = Path(output.path) / "manifest.json"
    content = json.loads(manifest_path.read_text())
    content["shards"][index].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest_path.write_text(json.dumps(content))
