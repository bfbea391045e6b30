"""Shard format (design contract 3): deterministic tar bytes, sidecars, done-markers, indexes and readers."""

from __future__ import annotations

import io
import json
import tarfile

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.shards import (
    SampleOutput,
    ShardDone,
    commit_shard,
    open_stage,
    read_done,
    tar_bytes,
    write_stage_index,
)
from pipeline.tar_samples import split_for_rank


def samples(n: int = 5, fail: tuple[int, ...] = ()) -> list[SampleOutput]:
    out = []
    for i in range(n):
        if i in fail:
            out.append(SampleOutput(key=f"s_{i:03d}", files=None, error="bad image: truncated", source=f"src{i}"))
        else:
            files = {"json": json.dumps({"i": i}).encode(), "grid.npy": _npy(np.full((2, 3), i, np.uint8))}
            out.append(SampleOutput(key=f"s_{i:03d}", files=files, source=f"src{i}", seconds=0.01 * i))
    return out


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_tar_bytes_are_deterministic_and_members_are_grouped_sorted_and_fixed():
    first, second = tar_bytes(samples()), tar_bytes(samples())
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == ["s_000.grid.npy", "s_000.json", "s_001.grid.npy", "s_001.json"]
    assert {m.mtime for m in members} == {946684800} and {m.uid for m in members} == {0}
    assert {m.uname for m in members} == {""}


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "sp ace", "x" * 201])
def test_invalid_keys_are_rejected_with_the_fix(key):
    with pytest.raises(ValueError, match="no dots"):
        tar_bytes([SampleOutput(key=key, files={"json": b"{}"})])


def test_failed_samples_go_to_the_sidecar_not_the_tar(tmp_path):
    fs = fsspec.filesystem("file")
    done = commit_shard(fs, str(tmp_path), 3, samples(4, fail=(1,)), "fp1")
    assert (done.count, done.failed, done.shard) == (3, 1, "000003")
    table = pq.read_table(tmp_path / "000003.parquet").to_pylist()
    assert [r["status"] for r in table] == ["ok", "failed", "ok", "ok"]
    assert table[1]["error"] == "bad image: truncated" and table[1]["source"] == "src1"
    with tarfile.open(tmp_path / "000003.tar") as tar:
        assert not any(name.startswith("s_001") for name in tar.getnames())


def test_done_marker_is_valid_only_for_its_fingerprint_and_intact_tar(tmp_path):
    fs = fsspec.filesystem("file")
    commit_shard(fs, str(tmp_path), 0, samples(3), "fp1")
    assert isinstance(read_done(fs, str(tmp_path), 0, "fp1"), ShardDone)
    assert read_done(fs, str(tmp_path), 0, "other") is None
    assert read_done(fs, str(tmp_path), 1, "fp1") is None
    with open(tmp_path / "000000.tar", "ab") as handle:  # a truncated or appended tar is not trusted
        handle.write(b"x")
    assert read_done(fs, str(tmp_path), 0, "fp1") is None
    (tmp_path / "000000.done.json").write_text("{not json")
    assert read_done(fs, str(tmp_path), 0, "fp1") is None


def _publish(root: str, n_shards: int = 3) -> str:
    fs, path = fsspec.core.url_to_fs(root)
    stage_dir = f"{path}/node/fp1"
    done = [commit_shard(fs, stage_dir, i, samples(4)[i:] + samples(0), "fp1") for i in range(n_shards)]
    manifest = {"node": "node", "fingerprint": "fp1", "num_samples": sum(d.count for d in done), "num_failed": 0,
                "shards": [{"name": f"{d.shard}.tar", "count": d.count} for d in done]}
    write_stage_index(fs, stage_dir, manifest, done)
    fs.pipe_file(f"{path}/node/current.json", json.dumps({"fingerprint": "fp1", "path": "fp1"}).encode())
    return root.rstrip("/") + "/node"


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_readers_agree_on_every_sample(tmp_path, scheme):
    root = str(tmp_path) if scheme == "file" else f"memory://shards-{tmp_path.name}"
    output = open_stage(_publish(root))
    ours = [(s["__key__"], s["json"], s["grid.npy"]) for s in output.samples()]
    assert len(ours) == output.num_samples == 4 + 3 + 2
    pipeline = [(s["__key__"], s["json"], s["grid.npy"]) for s in output.webdataset(split_by_node=False, decode=False)]
    torch_ds = [(s["__key__"], s["json"], s["grid.npy"]) for s in output.torch_dataset(decode=False)]
    assert pipeline == ours and torch_ds == ours
    if scheme == "file":
        plain_wds = wds.WebDataset(output.shard_urls(), shardshuffle=False)
        plain = [(s["__key__"], s["json"], s["grid.npy"]) for s in plain_wds]
        assert plain == ours
        by_tarfile = []
        for url in output.shard_urls():
            with tarfile.open(url) as tar:
                names = tar.getnames()
                by_tarfile += [(n.split(".")[0], tar.extractfile(n).read()) for n in names if n.endswith(".json")]
        assert by_tarfile == [(k, j) for k, j, _ in ours]


def test_stage_indexes_follow_open_clip_and_timm_formats(tmp_path):
    from timm.data.readers.reader_wds import _parse_split_info

    output = open_stage(_publish(str(tmp_path)))
    sizes = json.loads((tmp_path / "node" / "fp1" / "sizes.json").read_text())
    assert sizes == {"000000.tar": 4, "000001.tar": 3, "000002.tar": 2}
    info = json.loads((tmp_path / "node" / "fp1" / "_info.json").read_text())
    split = _parse_split_info("train", info)
    assert split.num_samples == output.num_samples and split.shard_lengths == (4, 3, 2)


def test_missing_stage_output_says_to_run_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run that stage first"):
        open_stage(str(tmp_path / "nothing"))


def test_rank_and_worker_splits_are_disjoint_and_complete():
    items = list(range(10))
    parts = [split_for_rank(items, r, 2, w, 3) for r in range(2) for w in range(3)]
    assert sorted(x for p in parts for x in p) == items
