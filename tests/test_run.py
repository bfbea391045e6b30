"""The runner: summaries, up-to-date checks, incremental re-runs, errors before work, exit codes, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import dag
from pipeline.config import ConfigError
from pipeline.run import compose, main, run
from pipeline.shards import SampleOutput, open_stage
from pipeline.stage import Resources, ShardPlan, Stage

REPO = Path(__file__).resolve().parents[1]
PROBE = "+gridstats={stage:gridstats,inputs:{grids:wordgrid}}"


@pytest.fixture(autouse=True)
def probe_stage(monkeypatch):
    monkeypatch.setitem(dag.STAGES, "gridstats", "stage_fixtures:GridStatsStage")


def config(root: Path | str, *overrides: str) -> dict:
    """The demo preset restricted to wordgrid (and the probe node when added): the foundation under test."""
    base = [f"output_root={root}", "executor=local", "wordgrid.num_samples=300", "wordgrid.samples_per_shard=100"]
    if not any(o.startswith("stages=") for o in overrides):
        base.append("stages=[wordgrid,gridstats]" if PROBE in overrides else "stages=[wordgrid]")
    return compose("demo", [*base, *overrides])


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_second_run_is_up_to_date_and_rewrites_nothing(tmp_path):
    first = run(config(tmp_path, PROBE))
    assert [(s.node, s.status, s.samples, s.shards) for s in first] == [
        ("wordgrid", "ran", 300, 3), ("gridstats", "ran", 300, 3)]
    before = snapshot(tmp_path)
    second = run(config(tmp_path, PROBE))
    assert [s.status for s in second] == ["up to date", "up to date"]
    assert snapshot(tmp_path) == before


def test_knob_change_reruns_node_and_descendants_into_new_fingerprints(tmp_path):
    run(config(tmp_path, PROBE))
    old = {n: open_stage(str(tmp_path / n)).fingerprint for n in ("wordgrid", "gridstats")}
    changed = run(config(tmp_path, PROBE, "wordgrid.max_grid_size=4"))
    assert [s.status for s in changed] == ["ran", "ran"]
    new = {n: open_stage(str(tmp_path / n)).fingerprint for n in ("wordgrid", "gridstats")}
    assert all(old[n] != new[n] for n in old)
    assert all((tmp_path / n / old[n] / "manifest.json").exists() for n in old)  # old outputs stay
    reverted = run(config(tmp_path, PROBE))
    assert [s.status for s in reverted] == ["up to date", "up to date"]
    # the node directory (current.json) points at the config just run, not at the last one that computed
    assert {n: open_stage(str(tmp_path / n)).fingerprint for n in old} == old
    run(config(tmp_path, PROBE, "dry_run=true", "wordgrid.max_grid_size=4"))  # a dry run moves no pointer
    assert {n: open_stage(str(tmp_path / n)).fingerprint for n in old} == old
    only_descendant = run(config(tmp_path, PROBE, "+gridstats.fail_every=0", "force=[gridstats]"))
    assert [s.status for s in only_descendant] == ["up to date", "ran"]


def test_resources_do_not_change_the_fingerprint(tmp_path):
    run(config(tmp_path))
    again = run(config(tmp_path, "wordgrid.resources.batch_size=7", "wordgrid.resources.num_cpus=0.5"))
    assert again[0].status == "up to date"


def test_missing_upstream_fails_before_any_work_naming_the_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"run it first: stages=\[wordgrid,gridstats\]"):
        run(config(tmp_path, PROBE, "stages=[gridstats]"))
    assert not any(tmp_path.iterdir())


def test_single_stage_rerun_reads_existing_upstream(tmp_path):
    run(config(tmp_path, "stages=[wordgrid]"))
    result = run(config(tmp_path, PROBE, "stages=[gridstats]"))
    assert [(s.node, s.status) for s in result] == [("gridstats", "ran")]


def test_failure_ratio_exit_code_and_failed_rows(tmp_path, capsys):
    argv = [f"output_root={tmp_path}", "executor=local", "wordgrid.num_samples=100", PROBE,
            "+gridstats.fail_every=10", "stages=[wordgrid,gridstats]"]
    assert main(argv) == 1
    assert "10 of 100 samples failed" in capsys.readouterr().err
    assert main([*argv, "max_failure_ratio=0.2"]) == 0  # shards are reused; only the check changes
    marker = next((tmp_path / "gridstats").glob("*/000000.done.json"))
    before = marker.stat().st_mtime_ns
    assert main([*argv, "max_failure_ratio=0.2"]) == 0
    assert marker.stat().st_mtime_ns == before  # reused
    assert main([*argv[:-1], "max_failure_ratio=0.2", "retry_failed=true", "stages=[gridstats]"]) == 0
    assert marker.stat().st_mtime_ns > before  # the shard with failed samples is redone
    import pyarrow.parquet as pq
    rows = pq.read_table(next((tmp_path / "gridstats").glob("*/000000.parquet"))).to_pylist()
    assert sum(r["status"] == "failed" for r in rows) == 10 and rows[0]["error"] == "injected failure"


@pytest.mark.parametrize("argv, message", [
    (["wordgrid.max_grid=3"], "max_grid"),
    (["conf=nope"], "presets"),
    (["stages=[nope]"], "not nodes"),
    (["stages=[train_ifseg]"], "run it first"),
    (["wordgrid.max_grid_size=abc"], "expected int"),
])
def test_bad_config_exits_2_with_a_message(tmp_path, capsys, argv, message):
    assert main([f"output_root={tmp_path}", "executor=local", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "wordgrid").exists()


def test_remote_fsspec_root(tmp_path):
    root = f"memory://runs-{tmp_path.name}"
    first = run(config(root, PROBE))
    assert [s.status for s in first] == ["ran", "ran"]
    assert [s.status for s in run(config(root, PROBE))] == ["up to date", "up to date"]
    output = open_stage(f"{root}/gridstats")
    assert sum(1 for _ in output.samples()) == 300


def _cli(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", f"output_root={root}", "executor=local", "stages=[wordgrid]",
            "wordgrid.num_samples=6000", "wordgrid.samples_per_shard=250", *extra]


def test_kill_9_mid_stage_then_resume_is_byte_identical(tmp_path):
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    process = subprocess.Popen(_cli(crashed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(crashed.glob("wordgrid/*/*.done.json"))) < 3:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p.name for p in crashed.glob("wordgrid/*/*.done.json")}
    assert 3 <= len(finished) < 24, "the kill must land mid-stage"
    assert not list(crashed.glob("wordgrid/*/manifest.json"))
    resumed = subprocess.run(_cli(crashed), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{24 - len(finished)} of 24 shards to run" in resumed.stderr
    subprocess.run(_cli(clean), cwd=REPO, check=True, capture_output=True, timeout=300)
    a, b = open_stage(str(crashed / "wordgrid")), open_stage(str(clean / "wordgrid"))
    assert a.fingerprint == b.fingerprint
    for x, y in zip(a.shard_urls(), b.shard_urls(), strict=True):
        assert Path(x).read_bytes() == Path(y).read_bytes()
    assert Path(a.path, "manifest.json").read_bytes() == Path(b.path, "manifest.json").read_bytes()


def test_weight_paths_do_not_enter_fingerprints_but_weight_content_does(tmp_path):
    from pipeline.fingerprint import stage_fingerprint

    config = {"clip": {"model_name": "toy-vit", "pretrained": "/a/toy.pt"}, "methods": [{"clip": {"weights": "x"}}]}
    moved = {"clip": {"model_name": "toy-vit", "pretrained": "/b/toy.pt"}, "methods": [{"clip": {"weights": "y"}}]}
    same = stage_fingerprint("train", "1", config, {}, {"clip": "sha256:abc"})
    assert same == stage_fingerprint("train", "1", moved, {}, {"clip": "sha256:abc"})
    assert same != stage_fingerprint("train", "1", config, {}, {"clip": "sha256:def"})


def test_force_publishes_a_new_manifest_without_deleting_the_one_others_read(tmp_path, monkeypatch):
    import pipeline.run as runner

    run(config(tmp_path))
    [manifest] = (tmp_path / "wordgrid").glob("*/manifest.json")
    seen, real = [], runner.make_executor

    def watching(kind):  # the executor starts when the forced shards are recomputed
        seen.append(manifest.exists())
        return real(kind)

    monkeypatch.setattr(runner, "make_executor", watching)
    [summary] = run(config(tmp_path, "force=[wordgrid]"))
    assert (summary.status, summary.reason, summary.reused) == ("ran", "forced", 0)
    assert seen == [True] and manifest.exists()


@dataclass
class ThreadProbeConfig:
    resources: Resources = field(default_factory=Resources)


class ThreadProbeStage(Stage):
    """One sample per upstream grid shard: torch's intra-op thread count in `setup` and while the shard runs."""

    kind = "threadprobe"
    schema = "threadprobe/1"
    input_ports = ("grids",)
    Config = ThreadProbeConfig

    def plan(self) -> list[ShardPlan]:
        return [ShardPlan(i, (i,)) for i in range(len(self.context.upstream["grids"].shard_urls()))]

    def setup(self) -> None:
        import torch

        self.at_setup = torch.get_num_threads()

    def process_batch(self, loaded: Sequence[int]) -> list[SampleOutput]:
        import torch

        body = json.dumps({"setup": self.at_setup, "shard": torch.get_num_threads()}).encode()
        return [SampleOutput(key=f"{item:06d}", files={"json": body}) for item in loaded]


@pytest.mark.parametrize("pinned, expected", [(1, 1), (0, 2)])
def test_torch_threads_knob_pins_the_count_while_the_node_runs_and_restores_it(tmp_path, monkeypatch,
                                                                               torch_threads, pinned, expected):
    import torch

    monkeypatch.setitem(dag.STAGES, "threadprobe", "test_run:ThreadProbeStage")
    torch_threads(2)  # the caller's state
    probe = f"+probe={{stage:threadprobe,inputs:{{grids:wordgrid}},resources:{{torch_threads:{pinned}}}}}"
    run(config(tmp_path, probe, "stages=[wordgrid,probe]"))
    seen = [json.loads(s["json"]) for s in open_stage(str(tmp_path / "probe")).samples()]
    assert seen == [{"setup": expected, "shard": expected}] * 3
    assert torch.get_num_threads() == 2  # restored


def test_pinned_torch_threads_restores_and_zero_leaves_torch_alone(torch_threads):
    import torch

    from pipeline.threads import pinned_torch_threads

    torch_threads(2)
    with pinned_torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(KeyError), pinned_torch_threads(1):
        raise KeyError("restored on errors too")
    assert torch.get_num_threads() == 2
    with pinned_torch_threads(0):
        assert torch.get_num_threads() == 2


def test_only_nodes_that_run_in_the_driver_pin_its_threads():
    from pipeline.run import _driver_threads

    def node(**resources: object) -> dag.Node:
        return dag.Node(name="n", kind="train", config={"resources": resources}, inputs={})

    assert _driver_threads(node(torch_threads=3), "local") == 3
    assert _driver_threads(node(torch_threads=3, backend="local"), "ray") == 3  # a local-backend trainer
    assert _driver_threads(node(torch_threads=3), "ray") == 0  # its work runs on Ray workers, which pin it there
    assert _driver_threads(node(), "local") == 0


@pytest.mark.parametrize("protocol", ["file", "memory"])
def test_resume_reads_every_valid_done_marker_in_one_listing_and_one_cat(tmp_path, protocol):
    import fsspec

    from pipeline.shards import commit_shard, read_done, read_dones

    fs = fsspec.filesystem(protocol)
    stage = str(tmp_path / "fp") if protocol == "file" else f"/resume-{os.getpid()}/fp"
    sample = [SampleOutput("k", {"txt": b"x"})]
    for index in range(5):
        commit_shard(fs, stage, index, sample, "other" if index == 3 else "fp")
    fs.pipe_file(f"{stage}/000001.tar", b"truncated")  # its marker's size no longer matches
    fs.pipe_file(f"{stage}/000002.done.json", b"{not json")
    fs.rm(f"{stage}/000004.tar")
    calls = []
    for name in ("cat", "cat_file", "size", "info", "find"):
        method = getattr(fs, name)
        setattr(fs, name, lambda *a, _m=method, _n=name, **k: (calls.append(_n), _m(*a, **k))[1])
    found = read_dones(fs, stage, range(7), "fp")
    assert calls.count("find") == calls.count("cat") == 1 and "size" not in calls  # not a GET + HEAD per shard
    assert sorted(found) == [0] and found[0].bytes == fs.size(f"{stage}/000000.tar")
    assert {i: read_done(fs, stage, i, "fp") for i in range(7)} == {i: found.get(i) for i in range(7)}
    assert read_dones(fs, f"{stage}-missing", range(3), "fp") == {}
    if protocol == "memory":
        fs.rm(stage.rsplit("/", 1)[0], recursive=True)
