"""The concurrent DAG driver without Ray: start rules, limits, failures; progress output; run records."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.progress import Board, NodeRun
from pipeline.run import compose, run
from pipeline.scheduler import run_dag, run_options
from pipeline.shards import ShardDone, open_stage

REPO = Path(__file__).resolve().parents[1]
DIAMOND = {"a": [], "b": [], "c": ["a", "b"], "d": ["b"]}  # a, b roots; c after both; d after b only


class Contained(RuntimeError):
    pass


class Recorder:
    """run_one for run_dag: logs (event, node) in order and tracks how many nodes run at once."""

    def __init__(self, behaviour: dict | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.running = self.peak = 0
        self.behaviour = behaviour or {}

    def __call__(self, name: str, abort: threading.Event) -> str:
        with self.lock:
            self.events.append(("start", name))
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            action = self.behaviour.get(name)
            if action is not None:
                action(abort)
            return name.upper()
        finally:
            with self.lock:
                self.running -= 1
                self.events.append(("end", name))

    def index(self, event: str, name: str) -> int:
        return self.events.index((event, name))


def test_independent_roots_run_at_once_and_a_node_starts_after_its_last_upstream():
    b_started = threading.Event()
    overlap = []
    recorder = Recorder({"a": lambda abort: overlap.append(b_started.wait(30)), "b": lambda abort: b_started.set()})
    results = run_dag(list(DIAMOND), DIAMOND, recorder)
    assert results == {"a": "A", "b": "B", "c": "C", "d": "D"}
    assert overlap == [True]  # a was still running when b started: they overlapped
    assert recorder.index("start", "c") > max(recorder.index("end", "a"), recorder.index("end", "b"))
    assert recorder.index("start", "d") > recorder.index("end", "b")


def test_max_concurrent_one_runs_in_order_one_at_a_time():
    recorder = Recorder()
    run_dag(list(DIAMOND), DIAMOND, recorder, max_concurrent=1)
    assert recorder.peak == 1
    assert [name for event, name in recorder.events if event == "start"] == ["a", "b", "c", "d"]


def test_exclusive_nodes_run_alone():
    recorder = Recorder()
    run_dag(list(DIAMOND), DIAMOND, recorder, exclusive=lambda name: name in ("a", "d"))
    starts = [i for i, (event, _) in enumerate(recorder.events) if event == "start"]
    for name in ("a", "d"):
        begin, end = recorder.index("start", name), recorder.index("end", name)
        assert end == begin + 1, f"{name} overlapped another node: {recorder.events}"
    assert len(starts) == 4


def test_contained_failure_skips_descendants_only():
    def fail(abort):
        raise Contained("bad data in a")

    recorder = Recorder({"a": fail})
    with pytest.raises(Contained, match="bad data in a"):
        run_dag(list(DIAMOND), DIAMOND, recorder, contained=(Contained,))
    started = {name for event, name in recorder.events if event == "start"}
    assert started == {"a", "b", "d"}  # c reads a: not run; b and d are independent of a and finish


def test_fatal_failure_aborts_running_nodes_and_starts_nothing_new():
    a_running = threading.Event()
    stopped = []

    def wait_for_abort(abort):
        a_running.set()
        stopped.append(abort.wait(30))

    def fail(abort):
        a_running.wait(30)
        raise ValueError("placement impossible")

    recorder = Recorder({"a": wait_for_abort, "b": fail})
    with pytest.raises(ValueError, match="placement impossible"):
        run_dag(list(DIAMOND), DIAMOND, recorder)
    assert stopped == [True]  # a saw the abort
    assert {name for event, name in recorder.events if event == "start"} == {"a", "b"}


@pytest.mark.parametrize("key, value, message", [
    ("progress", "fancy", "progress='fancy': expected one of"),
    ("max_concurrent_nodes", 0, "max_concurrent_nodes=0: must be >= 1"),
    ("stall_timeout_s", "soon", "stall_timeout_s='soon': expected float"),
])
def test_run_options_name_the_bad_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        run_options({key: value})


def test_progress_line_has_node_shards_samples_rate_and_eta():
    node_run = NodeRun("wordgrid")
    assert node_run.line().startswith("wordgrid: running for")
    node_run.begin(4)
    node_run.shard_done(ShardDone("000000", 10, 0, "x", 1, "fp"), {"node_id": "n1"})
    line = node_run.line()
    assert line.startswith("wordgrid: 1/4 shards, 10 samples, ") and " samples/s, ETA 0:" in line
    assert node_run.record()["shards_per_worker_node"] == {"n1": 1}


def test_board_in_a_log_writes_periodic_lines_for_each_running_node(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    assert Board("auto", stream=io.StringIO()).mode == "lines"  # not a terminal
    with Board("lines", interval_s=0.05, stream=io.StringIO()) as board:
        with board.node_run("wordgrid", 300, threading.Event()) as grids, \
                board.node_run("train_ifseg", 300, threading.Event()):
            grids.begin(2)
            for _ in range(600):  # until the ticker has written once (no time limit asserted)
                if any("train_ifseg: running for" in r.message for r in caplog.records):
                    break
                time.sleep(0.05)
    messages = [r.message for r in caplog.records]
    assert any(m.startswith("progress wordgrid: 0/2 shards, 0 samples") for m in messages)
    assert any(m.startswith("progress train_ifseg: running for") for m in messages)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_trainer_steps_in_a_log_are_lines_and_on_a_terminal_a_bar(caplog, monkeypatch):
    from pipeline.progress import StepProgress

    caplog.set_level(logging.INFO, logger="pipeline.progress")
    clock = iter(range(0, 10_000, 4))  # monotonic seconds: 4 s per call
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: next(clock))
    piped = io.StringIO()
    steps = StepProgress("train_ifseg", 10, initial=2, samples_per_step=8, interval_s=10, stream=piped)
    for step in range(3, 11):
        steps.update(1, **({"loss": "0.5000"} if step == 6 else {}))
    lines = [r.message for r in caplog.records]
    assert piped.getvalue() == "" and len(lines) == 3  # every ~10 s of the fake clock, and the last step
    assert lines[-1].startswith("progress train_ifseg: step 10/10, ") and lines[-1].endswith(", ETA 0:00:00, "
                                                                                             "loss=0.5000")
    caplog.clear()
    terminal = _Terminal()
    bar = StepProgress("train_ifseg", 3, stream=terminal)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue() and not caplog.records
    quiet = StepProgress("train_ifseg", 3, enabled=False, interval_s=0, stream=piped)  # ranks other than 0
    quiet.update(3)
    assert not caplog.records and piped.getvalue() == ""


NODES = [{"CPU": 0.0, "memory": 1e9, "node:127.0.0.1": 1.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0}]


def test_placement_counts_units_per_node_and_names_what_the_cluster_has(monkeypatch):
    from pipeline import cluster

    monkeypatch.setattr(cluster, "alive_nodes", lambda: NODES)
    assert cluster.capacity(cluster.demand(1.0), NODES) == 4
    assert cluster.capacity(cluster.demand(1.0, 1.0), NODES) == 1
    assert cluster.describe(NODES) == "3 node(s): 1 x {CPU: 0}, 1 x {CPU: 2, GPU: 1}, 1 x {CPU: 2}"
    assert cluster.check_placement("pseudolabel", "each actor", cluster.demand(0.5), 3, "x") == 3
    assert cluster.check_placement("pseudolabel", "each actor", cluster.demand(1.0, 1.0), 3, "x") == 1  # shrinks
    with pytest.raises(cluster.PlacementError, match=r"pseudolabel: each actor asks for \{CPU: 1, GPU: 2\}, "
                                                     r"which the cluster cannot hold \(room for 0\); the cluster "
                                                     r"has 3 node\(s\)"):
        cluster.check_placement("pseudolabel", "each actor", cluster.demand(1.0, 2.0), 1, "x")
    with pytest.raises(cluster.PlacementError, match=r"asks for 5 x \{CPU: 1\} at once.*room for 4"):
        cluster.check_placement("train_ifseg", "the worker group", cluster.demand(1.0), 5, "x", all_at_once=True)


def test_placement_counts_custom_resources_that_nodes_declare(monkeypatch):
    from pipeline import cluster

    nodes = [{"CPU": 4.0, "accelerator_a100": 2.0}, {"CPU": 4.0, "accelerator_a100": 0.5}, {"CPU": 8.0}]
    monkeypatch.setattr(cluster, "alive_nodes", lambda: nodes)
    wanted = cluster.demand(1.0, custom={"accelerator_a100": 1.0, "unused": 0.0})
    assert wanted == {"CPU": 1.0, "accelerator_a100": 1.0}
    assert cluster.capacity(wanted, nodes) == 2  # 2 on the first node, none on the others
    assert cluster.check_placement("pseudolabel", "each actor", wanted, 4, "x") == 2  # the pool shrinks to 2
    assert cluster.check_placement("p", "each actor", cluster.demand(1.0, custom={"accelerator_a100": 0.5}), 9,
                                   "x") == 5
    with pytest.raises(cluster.PlacementError, match=r"pseudolabel: each actor asks for \{CPU: 1, tpu: 1\}, which "
                                                     r"the cluster cannot hold \(room for 0\); the cluster has 3 "
                                                     r"node\(s\): .*\{CPU: 4, accelerator_a100: 2\}"):
        cluster.check_placement("pseudolabel", "each actor", cluster.demand(1.0, custom={"tpu": 1.0}), 1, "x")
    with pytest.raises(cluster.PlacementError, match=r"3 x \{CPU: 1, accelerator_a100: 1\} at once.*room for 2"):
        cluster.check_placement("train_ifseg", "the worker group", wanted, 3, "x", all_at_once=True)


def test_unreachable_ray_address_exits_2_in_seconds_with_one_line(tmp_path, capsys):
    from pipeline.run import main

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main([f"output_root={tmp_path}", "stages=[wordgrid]", f"ray.address=127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot reach the Ray cluster at '127.0.0.1:{port}'")
    assert "ray start --head" in err[-1]


def _cfg(root: Path, *extra: str) -> dict:
    return compose("demo", [f"output_root={root}", "executor=local", "stages=[wordgrid]", "wordgrid.num_samples=300",
                            "wordgrid.samples_per_shard=100", *extra])


def test_run_record_beside_the_manifest_while_manifest_and_shards_stay_identical(tmp_path):
    run(_cfg(tmp_path))
    output = open_stage(str(tmp_path / "wordgrid"))
    manifest = Path(output.path, "manifest.json").read_bytes()
    shards = [Path(u).read_bytes() for u in output.shard_urls()]
    first = json.loads(Path(output.path, "run.json").read_text())
    assert first["status"] == "ran" and first["started"] <= first["ended"] and first["shards_run"] == 3
    assert set(first["placements"]) == {"000000", "000001", "000002"}
    assert "run" not in json.loads(manifest) and "started" not in json.dumps(json.loads(manifest))
    run(_cfg(tmp_path, "force=[wordgrid]"))
    second = json.loads(Path(output.path, "run.json").read_text())
    assert second["started"] > first["started"]
    assert Path(output.path, "manifest.json").read_bytes() == manifest
    assert [Path(u).read_bytes() for u in output.shard_urls()] == shards


def test_progress_in_a_log_is_a_few_lines_not_tqdm_frames(tmp_path):
    """200 shards with stdout and stderr piped (not a terminal): periodic lines, a few KB in all."""
    argv = [sys.executable, "-m", "pipeline.run", f"output_root={tmp_path}", "executor=local", "stages=[wordgrid]",
            "wordgrid.num_samples=2000", "wordgrid.samples_per_shard=10", "progress_interval_s=2"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "\r" not in output and "2000 samples" in result.stdout
    assert len(output.encode()) < 4096, output  # tqdm wrote a ~100-byte frame per shard into one line


def test_trainer_manifest_has_no_timing_and_its_steps_log_as_lines(tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    train = ["stages=[wordgrid,train_ifseg]", "train_ifseg.loop.steps=6", "train_ifseg.loop.log_every=3",
             "train_ifseg.loop.checkpoint_every=6", "train_ifseg.batch_size=4", "train_ifseg.ifseg.width=32",
             "train_ifseg.ifseg.depth=1", "train_ifseg.ifseg.heads=2", "train_ifseg.ifseg.label_size=16",
             "train_ifseg.prompt_templates=single"]
    run(_cfg(tmp_path / "a", *train))
    output = open_stage(str(tmp_path / "a" / "train_ifseg"))
    manifest = Path(output.path, "manifest.json").read_bytes()
    assert set(json.loads(manifest)["final_log"]) >= {"step", "lr", "loss"}
    assert "samples_per_s" not in json.loads(manifest)["final_log"]
    assert json.loads(Path(output.path, "run.json").read_text())["metrics"]["train_samples_per_s"] > 0
    assert any(r.message.startswith("progress train_ifseg: step 6/6, ") for r in caplog.records)
    assert "\r" not in capfd.readouterr().err  # no tqdm frames when stderr is not a terminal
    run(_cfg(tmp_path / "b", *train))  # the same run again: its timings differ, its manifest does not
    assert Path(open_stage(str(tmp_path / "b" / "train_ifseg")).path, "manifest.json").read_bytes() == manifest
