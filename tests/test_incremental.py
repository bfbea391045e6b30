"""Incremental re-runs: every input change is seen, only changed shards are computed, the result equals a
from-scratch run byte for byte, and `dry_run` says why without writing anything."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from incremental_fixtures import KINDS
from PIL import Image

from pipeline import dag
from pipeline.run import compose, main, run
from pipeline.shards import open_stage
from pipeline.stage import content_defined_cuts, shard_plans


@pytest.fixture(autouse=True)
def fixture_stages(monkeypatch):
    for kind, target in KINDS.items():
        monkeypatch.setitem(dag.STAGES, kind, target)


def png(seed: int, size: int = 4) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def put(fs: fsspec.AbstractFileSystem, path: str, body: bytes) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, body)


class FolderInput:
    """Image files under one folder (local path or memory:// URL)."""

    def __init__(self, url: str, count: int) -> None:
        self.fs, self.base = fsspec.core.url_to_fs(url)
        self.url = url
        for i in range(count):
            self.write(f"img{i:03d}", i)

    @property
    def data(self) -> dict:
        return {"kind": "folder", "root": self.url}

    def write(self, name: str, seed: int, size: int = 4) -> None:
        put(self.fs, f"{self.base}/{name}.png", png(seed, size))

    def add(self) -> None:
        self.write("img010b", 1000)

    def remove(self) -> None:
        self.fs.rm_file(f"{self.base}/img005.png")

    def modify(self) -> None:
        self.write("img007", 2000, size=5)

    def rename(self) -> None:
        self.fs.mv(f"{self.base}/img012.png", f"{self.base}/img012_renamed.png")


class CocoInput(FolderInput):
    """A COCO JSON (one "sky" polygon per image) beside its image folder."""

    def __init__(self, url: str, count: int) -> None:
        self.images: dict[str, tuple[int, int]] = {}  # name -> (image id, side), ids stable like a real COCO JSON
        super().__init__(url, count)

    @property
    def data(self) -> dict:
        return {"kind": "coco", "annotation_file": f"{self.url}/ann.json", "image_root": f"{self.url}/img"}

    def write(self, name: str, seed: int, size: int = 4) -> None:
        put(self.fs, f"{self.base}/img/{name}.png", png(seed, size))
        self.images[name] = (self.images.get(name, (seed, 0))[0], size)
        self.save()

    def save(self) -> None:
        images = [{"id": i, "file_name": f"{name}.png", "height": size, "width": size}
                  for name, (i, size) in sorted(self.images.items())]
        annotations = [{"id": image["id"], "image_id": image["id"], "category_id": 1, "area": 4.0, "iscrowd": 0,
                        "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]} for image in images]
        body = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "sky"}]}
        put(self.fs, f"{self.base}/ann.json", json.dumps(body).encode())

    def remove(self) -> None:
        del self.images["img005"]
        self.save()

    def rename(self) -> None:
        self.fs.mv(f"{self.base}/img/img012.png", f"{self.base}/img/img012_renamed.png")
        self.images["img012_renamed"] = self.images.pop("img012")
        self.save()


class ShardsInput(FolderInput):
    """WebDataset tars of 6 samples each; the shards adapter's items are known per tar."""

    def __init__(self, url: str, count: int) -> None:
        self.tars: dict[str, dict[str, bytes]] = {}
        self.fs, self.base = fsspec.core.url_to_fs(url)
        self.url = url
        for i in range(count):
            self.tars.setdefault(f"part{i // 6}", {})[f"img{i:03d}"] = png(i)
        for name in self.tars:
            self.save(name)

    @property
    def data(self) -> dict:
        return {"kind": "shards", "urls": self.url, "with_labels": False}

    def save(self, name: str) -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for key, body in sorted(self.tars[name].items()):
                info = tarfile.TarInfo(f"{key}.png")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        put(self.fs, f"{self.base}/{name}.tar", buffer.getvalue())

    def add(self) -> None:
        self.tars["part9"] = {"img100": png(1000)}
        self.save("part9")

    def remove(self) -> None:
        del self.tars["part0"]["img005"]
        self.save("part0")

    def modify(self) -> None:
        self.tars["part1"]["img007"] = png(2000, size=5)
        self.save("part1")

    def rename(self) -> None:
        self.fs.mv(f"{self.base}/part2.tar", f"{self.base}/part2_renamed.tar")
        self.tars["part2_renamed"] = self.tars.pop("part2")


INPUTS = {"folder": FolderInput, "coco": CocoInput, "shards": ShardsInput}


def config(root: str, data: dict, *overrides: str) -> dict:
    cfg = compose("demo", [f"output_root={root}", "executor=local", "wordgrid.num_samples=20",
                           "wordgrid.samples_per_shard=10", "+stats={stage:imagestats,samples_per_shard:4}",
                           "+tally={stage:tally,inputs:{src:stats}}", "stages=[wordgrid,stats,tally]", *overrides])
    cfg["stats"]["data"] = data
    return cfg


def shard_bytes(root: str, node: str) -> list[bytes]:
    output = open_stage(f"{root}/{node}")
    return [output.fs.cat_file(path) for path in (f"{output.path}/{s['name']}" for s in output.manifest["shards"])]


def comparable(root: str) -> dict:
    manifest = dict(open_stage(f"{root}/stats").manifest)
    return {key: manifest[key] for key in ("fingerprint", "shards", "num_samples", "pixels", "input")}


@pytest.fixture(params=["local", "memory"])
def where(request, tmp_path) -> Path | str:
    return tmp_path if request.param == "local" else f"memory://incremental-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_every_change_reruns_the_node_and_descendants_reusing_unchanged_shards(where, kind):
    source, out, scratch = (f"{where}/{name}" for name in ("input", "out", "scratch"))
    data = INPUTS[kind](source, 24)
    first = run(config(out, data.data))
    assert [(s.node, s.status, s.samples) for s in first] == [("wordgrid", "ran", 20), ("stats", "ran", 24),
                                                             ("tally", "ran", 24)]
    assert [s.status for s in run(config(out, data.data))] == ["up to date"] * 3
    for change in ("add", "remove", "modify", "rename"):
        before = {s["sha256"] for s in open_stage(f"{out}/stats").manifest["shards"]}
        getattr(data, change)()
        wordgrid, stats, tally = run(config(out, data.data))
        assert (wordgrid.status, stats.status, tally.status) == ("up to date", "ran", "ran"), change
        assert 0 < stats.reused < stats.samples, change
        rewritten = [s for s in open_stage(f"{out}/stats").manifest["shards"] if s["sha256"] not in before]
        assert len(rewritten) <= 2 and (rewritten or (kind, change) == ("shards", "rename")), change
        computed = stats.samples - stats.reused  # the shards adapter knows changes per tar: it may recompute more
        assert computed == sum(s["count"] for s in rewritten) or (kind == "shards" and computed > 0), change
        fs = fsspec.core.url_to_fs(scratch)[0]
        if fs.exists(fsspec.core.url_to_fs(scratch)[1]):
            fs.rm(fsspec.core.url_to_fs(scratch)[1], recursive=True)
        run(config(scratch, data.data, "stages=[stats]"))
        assert comparable(out) == comparable(scratch), change
        assert shard_bytes(out, "stats") == shard_bytes(scratch, "stats"), change


def test_adding_one_item_to_2000_rewrites_at_most_two_shards(tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    one = png(0, size=1)
    for i in range(2000):
        (source / f"im{i:05d}.png").write_bytes(one)
    data = {"kind": "folder", "root": str(source)}
    run(config(tmp_path / "out", data, "stages=[stats]", "stats.samples_per_shard=100"))
    before = {s["sha256"] for s in open_stage(str(tmp_path / "out" / "stats")).manifest["shards"]}
    (source / "im01000a.png").write_bytes(one)
    [summary] = run(config(tmp_path / "out", data, "stages=[stats]", "stats.samples_per_shard=100"))
    after = open_stage(str(tmp_path / "out" / "stats")).manifest["shards"]
    rewritten = [s for s in after if s["sha256"] not in before]
    assert summary.samples == 2001 and len(rewritten) <= 2
    assert summary.samples - summary.reused == sum(s["count"] for s in rewritten) <= 2 * 4 * 100


def test_content_defined_cuts_are_stable_under_insertion():
    keys = [f"k{i:05d}" for i in range(5000)]
    cuts = content_defined_cuts(keys, 50)
    sizes = np.diff([0, *cuts])
    assert cuts[-1] == 5000 and sizes.min() >= 12 and sizes.max() <= 200 and 40 < sizes.mean() < 60
    inserted = sorted([*keys, "k02500x"])
    old = {tuple(keys[a:b]) for a, b in zip([0, *cuts], cuts)}
    new = [tuple(inserted[a:b]) for a, b in zip([0, *content_defined_cuts(inserted, 50)], content_defined_cuts(
        inserted, 50))]
    assert sum(shard not in old for shard in new) <= 2


def test_small_inputs_and_indices_keep_equal_runs():
    assert [len(p.items) for p in shard_plans(range(10), 4)] == [4, 4, 2]  # wordgrid: indices, as before
    refs = [type("Ref", (), {"key": f"k{i}"})() for i in range(7)]
    assert [len(p.items) for p in shard_plans(refs, 2)] == [2, 2, 2, 1]  # fewer than 4 shards' worth
    assert [p.index for p in shard_plans(refs * 3, 2)] == list(range(len(shard_plans(refs * 3, 2))))


def test_dry_run_names_changed_keys_and_items_and_writes_nothing(tmp_path, capsys):
    data = FolderInput(str(tmp_path / "input"), 24)
    out = tmp_path / "out"
    run(config(out, data.data))
    data.add()
    data.remove()
    listing = {str(p): p.stat().st_mtime_ns for p in out.rglob("*")}
    summaries = run(config(out, data.data, "dry_run=true", "wordgrid.max_grid_size=4"))
    assert [(s.node, s.status) for s in summaries] == [("wordgrid", "would run"), ("stats", "would run"),
                                                        ("tally", "would run")]
    wordgrid, stats, tally = (s.reason for s in summaries)
    assert "wordgrid.max_grid_size: 8 -> 4" in wordgrid
    assert "inputs: 1 added (folder_img010b_" in stats and "1 removed (folder_img005_" in stats
    assert "0 changed of 24 items" in stats
    assert "upstream src (stats) changed" in tally
    assert {str(p): p.stat().st_mtime_ns for p in out.rglob("*")} == listing
    capsys.readouterr()
    code = main([f"output_root={out}", "executor=local", "stages=[wordgrid]", "wordgrid.num_samples=20",
                 "wordgrid.samples_per_shard=10", "wordgrid.max_grid_size=4", "dry_run=true"])
    printed = capsys.readouterr().out
    assert code == 0 and "would run" in printed and "nothing written" in printed
    assert {str(p): p.stat().st_mtime_ns for p in out.rglob("*")} == listing
    ran = run(config(out, data.data))  # a normal run prints the same reasons on its summary lines
    assert "1 added" in ran[1].reason and "computed" in ran[1].line() and "reused" in ran[1].line()
