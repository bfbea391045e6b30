"""The export runs its shards as Ray tasks (the CLI's default executor) and writes what the local executor writes;
an unsafe shard refused on a Ray worker fails that shard, named with its reason, while the other shard commits."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from label_fixtures import label_sample, publish, raw_tar, replace_shard

from pipeline.data.vocab import load_vocab
from pipeline.executor import ShardsFailed
from pipeline.export.__main__ import parse_args, run_config
from pipeline.run import run

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def tree(root: Path) -> dict[str, bytes]:
    """The exported images and label maps (the config snippet names its own folder, so it differs)."""
    return {str(p.relative_to(root)): p.read_bytes() for folder in ("img_dir", "ann_dir")
            for p in sorted((root / folder).rglob("*")) if p.is_file()}


def test_export_on_ray_equals_the_local_export_and_refuses_unsafe_shards(tmp_path):
    import ray

    vocab = load_vocab("toy")
    labels = [np.full((8, 8), i % 12, dtype=np.uint8) for i in range(6)]
    node = publish(str(tmp_path / "src"), "pl", vocab,
                   [[label_sample(f"s{3 * j + i}", labels[3 * j + i], vocab) for i in range(3)] for j in range(2)])
    local = run_config(parse_args([node, "--format", "mmseg", "--out", str(tmp_path / "local"), "--executor", "local"]))
    run(local)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        on_ray = run_config(parse_args([node, "--format", "mmseg", "--out", str(tmp_path / "ray")]))
        on_ray["ray"] = {"num_cpus": 2, "temp_dir": temp_dir}
        summary, = run(on_ray)
        assert (summary.status, summary.samples, summary.shards) == ("ran", 6, 2)
        replace_shard(node, 1, raw_tar([("../escaped.label.png", b"x", "file")]))
        unsafe = run_config(parse_args([node, "--format", "mmseg", "--out", str(tmp_path / "unsafe"), "--force"]))
        unsafe["ray"] = on_ray["ray"]
        with pytest.raises(ShardsFailed, match="UnsafeShardError: .*climbs out"):  # refused on a worker
            run(unsafe)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert tree(tmp_path / "ray") == tree(tmp_path / "local") and len(tree(tmp_path / "local")) == 12
    assert not (tmp_path / "escaped.label.png").exists()
