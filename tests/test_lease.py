"""The per-output lease: one writer at a time on local disks, fsspec memory and S3; dead holders are taken over."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
from object_store import moto_s3

from pipeline.lease import HOST, LeaseConfig, LeaseHeld, acquire, read_holder

REPO = Path(__file__).resolve().parents[1]
QUICK = LeaseConfig(wait_s=0, stale_s=30, heartbeat_s=0.05, settle_s=0.05, poll_s=0.02)
HOLD = """
import sys, time, fsspec
from pipeline.lease import LeaseConfig, acquire
acquire(fsspec.filesystem("file"), sys.argv[1], LeaseConfig(heartbeat_s=0.05), "holder")
print("held", flush=True)
time.sleep(120)
"""


def write_lease(fs: fsspec.AbstractFileSystem, path: str, host: str, pid: int, age_s: float) -> None:
    beat = time.time() - age_s
    fs.pipe_file(path, json.dumps({"owner": "someone", "host": host, "pid": pid, "node": "other", "started": beat,
                                   "heartbeat": beat}).encode())


def test_a_killed_holders_lease_is_taken_over(tmp_path):
    path = str(tmp_path / "_lease.json")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, path], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=rf"pid {holder.pid} on host {HOST}"):
            acquire(fsspec.filesystem("file"), path, QUICK, "second")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lease = acquire(fsspec.filesystem("file"), path, QUICK, "second")  # dead pid on this host: taken at once
    assert read_holder(lease.fs, path).pid == os.getpid() and read_holder(lease.fs, path).node == "second"
    lease.release()
    assert not Path(path).exists()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_heartbeat_decides_for_holders_on_other_hosts(tmp_path, where):
    fs = fsspec.filesystem("file" if where == "local" else "memory")
    path = str(tmp_path / "_lease.json") if where == "local" else f"/lease-{tmp_path.name}/_lease.json"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_lease(fs, path, "worker-7", 4242, age_s=1)
    with pytest.raises(LeaseHeld, match="pid 4242 on host worker-7"):
        acquire(fs, path, QUICK, "mine")
    write_lease(fs, path, "worker-7", 4242, age_s=60)  # older than stale_s = 30
    lease = acquire(fs, path, QUICK, "mine")
    assert read_holder(fs, path).owner == lease.holder.owner
    lease.check()
    lease.release()


def test_a_waiting_run_gets_the_lease_when_the_holder_releases(tmp_path):
    fs, path = fsspec.filesystem("file"), str(tmp_path / "_lease.json")
    first = acquire(fs, path, QUICK, "first")
    threading.Timer(0.3, first.release).start()
    second = acquire(fs, path, LeaseConfig(wait_s=60, heartbeat_s=0.05, poll_s=0.02), "second")
    assert second.waited and read_holder(fs, path).node == "second"
    second.release()


def test_only_one_of_many_concurrent_claims_wins(tmp_path):
    fs, path = fsspec.filesystem("file"), str(tmp_path / "_lease.json")
    results, barrier = [], threading.Barrier(6)

    def claim() -> None:
        barrier.wait()
        try:
            results.append(acquire(fs, path, QUICK, "race"))
        except LeaseHeld:
            results.append(None)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [lease for lease in results if lease is not None]
    assert len(winners) == 1
    winners[0].release()


def test_object_store_lease_write_then_verify(monkeypatch):
    with moto_s3(monkeypatch) as fs:
        path = "segetl-test/out/node/abc/_lease.json"
        # no heartbeat during the test: a refresh that read its own lease just before the thief's write would put
        # it back (read-then-write is not atomic on object stores) and the check below would pass by chance
        lease = acquire(fs, path, dataclasses.replace(QUICK, heartbeat_s=3600), "s3")
        assert read_holder(fs, path).owner == lease.holder.owner
        with pytest.raises(LeaseHeld, match=f"on host {HOST}"):
            acquire(fs, path, QUICK, "other")
        write_lease(fs, path, "thief", 1, age_s=0)  # another host overwrote it: this run must not publish
        with pytest.raises(Exception, match="taken over"):
            lease.check()
        lease.release()
        assert read_holder(fs, path).host == "thief"  # release never deletes someone else's lease


RUN = ("import sys; sys.path.insert(0, 'tests'); from incremental_fixtures import KINDS; from pipeline import dag; "
       "dag.STAGES.update(KINDS); from pipeline.run import main; sys.exit(main(sys.argv[1:]))")


def _cli(root: Path, images: Path) -> list[str]:
    return [sys.executable, "-c", RUN, f"output_root={root}", "executor=local", "wordgrid.num_samples=3000",
            "wordgrid.samples_per_shard=250", f"+stats={{stage:imagestats,data:{{kind:folder,root:{images}}}}}",
            "stages=[wordgrid,stats]", "lease.poll_s=0.05"]


def test_two_processes_on_one_root_both_succeed_and_equal_a_single_run(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(30):
        Image.new("RGB", (4, 4), (i, 2 * i, 3 * i)).save(images / f"im{i:02d}.png")
    shared, single = tmp_path / "shared", tmp_path / "single"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen(_cli(shared, images), cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    subprocess.run(_cli(single, images), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    for node in ("wordgrid", "stats"):
        (a,), (b,) = (list((root / node).glob("*/manifest.json")) for root in (shared, single))
        assert a.read_bytes() == b.read_bytes()
        assert sorted(p.name for p in a.parent.iterdir()) == sorted(p.name for p in b.parent.iterdir())
        for tar in sorted(a.parent.glob("*.tar")):
            assert tar.read_bytes() == (b.parent / tar.name).read_bytes()
    assert not list(shared.rglob("_lease.json*"))
