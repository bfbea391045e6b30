"""Ray execution: in-process Ray gives the same bytes as the local executor; `ray job submit` end to end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.run import compose, run
from pipeline.shards import open_stage

REPO = Path(__file__).resolve().parents[1]
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_bytes(root: Path) -> list[bytes]:
    return [Path(u).read_bytes() for u in open_stage(str(root / "wordgrid")).shard_urls()]


def test_ray_executor_matches_local_executor_bytes(tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    common = ["stages=[wordgrid]", "wordgrid.num_samples=1200", "wordgrid.samples_per_shard=200"]
    run(compose("demo", [f"output_root={tmp_path / 'local'}", "executor=local", *common]))
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    # an address left by an earlier cluster: with no ray.address / RAY_ADDRESS the run must start its own Ray
    Path(temp_dir, "ray_current_cluster").write_text("127.0.0.1:1")
    try:
        cfg = compose("demo", [f"output_root={tmp_path / 'ray'}", "executor=ray", "ray.num_cpus=2",
                               f"ray.temp_dir={temp_dir}", *common])
        summaries = run(cfg)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert summaries[0].status == "ran" and summaries[0].shards == 6
    assert _shard_bytes(tmp_path / "ray") == _shard_bytes(tmp_path / "local")


def test_ray_job_submit_end_to_end(tmp_path, monkeypatch):
    """`ray job submit -- python -m pipeline.run ...` on a head node this test starts, and stops by its handle."""
    from ray.cluster_utils import Cluster

    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    # Ray writes the head's address to <RAY_TMPDIR>/ray/ray_current_cluster and does not create the folder: keep
    # it in this test's own directory (a stale one in /tmp/ray would capture other runs on this machine)
    os.makedirs(os.path.join(temp_dir, "ray"))
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    dash_port = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "temp_dir": temp_dir, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dash_port, "dashboard_agent_listen_port": _free_port()})  # not Ray's fixed default port
    try:
        out = tmp_path / "out"
        command = [str(Path(sys.executable).with_name("ray")), "job", "submit",
                   f"--address=http://127.0.0.1:{dash_port}", "--", sys.executable, "-m", "pipeline.run", "conf=coco",
                   "stages=[wordgrid]", f"output_root={out}", "wordgrid.num_samples=2000",
                   "wordgrid.samples_per_shard=500"]
        for _ in range(30):  # the head's dashboard and job agent come up a few seconds after the head itself
            job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
            if "No available agent" not in job.stderr and "Connection refused" not in job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout + job.stderr
        assert "wordgrid" in job.stdout and "ran" in job.stdout
        output = open_stage(str(out / "wordgrid"))
        assert output.num_samples == 2000 and len(output.shard_urls()) == 4
        assert output.manifest["vocab"]["name"] == "coco_stuff_171"
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_model_stage_runs_on_an_actor_pool_like_locally(tmp_path):
    """A model stage (models loaded once per actor) through Ray's actor pool gives the local executor's labels."""
    import ray

    common = ["stages=[pseudolabel]", "toy.train_images=4", "toy.size=64", "pseudolabel.samples_per_shard=2",
              "pseudolabel.amg.points_per_side=4"]
    run(compose("demo", [f"output_root={tmp_path / 'local'}", "executor=local", *common]))
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        summaries = run(compose("demo", [f"output_root={tmp_path / 'ray'}", "executor=ray", "ray.num_cpus=2",
                                         f"ray.temp_dir={temp_dir}", "pseudolabel.resources.num_cpus=0.5",
                                         "pseudolabel.resources.pool_size=2", *common]))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert [(s.node, s.status, s.samples, s.shards) for s in summaries] == [("pseudolabel", "ran", 4, 2)]
    labels = {name: {s["__key__"]: s["label.png"] for s in open_stage(str(tmp_path / name / "pseudolabel")).samples()}
              for name in ("local", "ray")}
    assert len(labels["ray"]) == 4 and labels["ray"] == labels["local"]
