"""`python -m pipeline.run conf=NAME [stages=[..]] [force=[..]] [key=value ...]`: run a preset's DAG.

The preset is `conf/NAME.yaml` (default `demo`), composed with Hydra's compose API: Hydra never changes the
working directory, and workers receive the resolved config as plain data, never paths to config files.
Under `ray job submit` the driver connects to the job's cluster (RAY_ADDRESS); otherwise a fresh local Ray starts
in-process (`pipeline.cluster.init_ray`). Independent nodes run at the same time (`pipeline.scheduler`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec

from pipeline import dag, explain, incremental, scheduler
from pipeline.cluster import init_ray
from pipeline.config import ConfigError, build_config
from pipeline.executor import ShardsFailed, make_executor
from pipeline.fingerprint import NodeFingerprint
from pipeline.lease import LeaseConfig, LeaseHeld, LeaseLost, hold
from pipeline.overrides import config_hint, split_data_overrides
from pipeline.planning import plan_fingerprints, planned_fingerprint
from pipeline.progress import Board
from pipeline.shards import (
    MANIFEST_NAME,
    ShardDone,
    StageOutput,
    join,
    read_dones,
    read_pointer,
    write_pointer,
    write_stage_index,
)
from pipeline.stage import Resources, ShardPlan, Stage, StageContext
from pipeline.threads import pinned_torch_threads

log = logging.getLogger("pipeline")
PACKAGES = ("torch", "ray", "open_clip_torch", "segment-anything", "transformers", "webdataset", "numpy", "pyarrow")


class FailureRatioExceeded(RuntimeError):
    """More samples failed than `max_failure_ratio` allows; the shards are kept, the stage is not published."""


def conf_dir() -> Path:
    """The directory of the Hydra presets (`conf/` next to the packages; override with SEGETL_CONF_DIR)."""
    return Path(os.environ.get("SEGETL_CONF_DIR", Path(__file__).resolve().parents[1] / "conf"))


def repo_path(relative: str) -> str:
    """`${repo:assets/x}` in configs: a path relative to the project root, valid from any working directory."""
    return str(Path(__file__).resolve().parents[1] / relative)


def compose(preset: str = "demo", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compose `conf/<preset>.yaml` with Hydra overrides into a plain, resolved dict (see `compose_config`)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config(preset, overrides), resolve=True)


def compose_config(preset: str = "demo", overrides: Sequence[str] = ()) -> Any:
    """The composed, unresolved OmegaConf config (interpolations such as `${coco_root}` kept).

    Hydra's override grammar, plus one rule of ours: `<node>.data={kind: ..., ...}` *replaces* the node's input
    adapter mapping instead of merging into it (an adapter is chosen whole: the preset's toyworld `num_images`
    means nothing to a folder), so it needs no `~`/`+` dance.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", repo_path)
    available = sorted(p.stem for p in conf_dir().glob("*.yaml") if p.stem != "base")
    if preset not in available:
        raise ConfigError(f"conf={preset!r} not found in {conf_dir()}; presets: {available}")
    hydra_overrides, replacements = split_data_overrides(overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = hydra_compose(config_name=preset, overrides=hydra_overrides)
    for key, value in replacements:
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def parse_argv(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Split `conf=NAME` from the Hydra overrides."""
    preset, overrides = "demo", []
    for arg in argv:
        if arg.startswith("conf="):
            preset = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return preset, overrides


@dataclass
class NodeSummary:
    """One line of the run summary.

    Attributes:
        status: "ran", "up to date", or (dry_run) "would run".
        reused: of `samples`, those published from earlier shards (resumed, or unchanged items of an earlier
            output) instead of computed.
        reason: why the node ran or would run (`pipeline.explain`); "" when up to date.
    """

    node: str
    status: str
    samples: int
    failed: int
    shards: int
    seconds: float
    reused: int = 0
    reason: str = ""

    def line(self) -> str:
        if self.status == "would run":
            return f"{self.node:<14} {self.status:<11} {self.reason}"
        rate = f"{self.samples / self.seconds:10.1f} samples/s" if self.status == "ran" and self.seconds else ""
        text = (f"{self.node:<14} {self.status:<11} {self.samples:>9} samples {self.failed:>6} failed "
                f"{self.shards:>6} shards {self.seconds:9.2f} s {rate}")
        if self.status == "ran" and self.shards:
            text += f"  {self.samples - self.reused} computed, {self.reused} reused"
        return f"{text}  ({self.reason})" if self.reason else text


def output_root(cfg: Mapping[str, Any]) -> str:
    """The output root as an absolute path or URL (relative local paths resolve against the launch cwd)."""
    root = str(cfg["output_root"])
    return root if "://" in root else os.path.abspath(root)


def check_inputs_exist(nodes: Mapping[str, dag.Node], selected: list[str], fingerprints: Mapping[str, str],
                       fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Fail before any work when a selected node reads an upstream output that is neither run now nor on disk."""
    for name in selected:
        for port, upstream in nodes[name].inputs.items():
            if upstream in selected:
                continue
            if not fs.exists(join(root, upstream, fingerprints[upstream], MANIFEST_NAME)):
                raise ConfigError(f"{name} reads {port} from {upstream!r}, whose output for this config does not "
                                  f"exist under {join(root, upstream)}; run it first: stages=[{upstream},{name}]")


def run_node(node: dag.Node, cfg: Mapping[str, Any], fingerprints: Mapping[str, str], root: str, forced: bool,
             executor_kind: str) -> NodeSummary:
    """Run (or skip, when up to date) one node and publish its manifest and pointer.

    A node with work says why (`pipeline.explain`); with `dry_run` that is all it does. Otherwise it takes the
    output's lease (`pipeline.lease`: a concurrent run of the same output is waited for and its commit reused),
    reuses the shards of unchanged items of the newest earlier output with the same base, computes the rest and
    publishes the manifest atomically (a forced re-run never deletes the manifest others may be reading).
    """
    fs, root_path = fsspec.core.url_to_fs(root)
    node_dir = join(root_path, node.name)
    out_path = join(node_dir, fingerprints[node.name])
    if not forced and (summary := _up_to_date(fs, node, out_path, cfg)):
        if not cfg.get("dry_run"):
            _point_at(fs, node_dir, fingerprints[node.name])
        return summary
    planned = planned_fingerprint(node, cfg, fingerprints)
    history = incremental.earlier_outputs(fs, node_dir, exclude=planned.value)
    reason = explain.why(fs, node.name, planned, history, out_path, forced)
    if cfg.get("dry_run"):
        return NodeSummary(node.name, "would run", 0, 0, 0, 0.0, reason=reason)
    with hold(fs, out_path, build_config(LeaseConfig, cfg.get("lease"), "lease"), node.name) as lease:
        if not (forced and not lease.waited) and (summary := _up_to_date(fs, node, out_path, cfg)):
            summary.reason = "committed by a concurrent run"  # while this run waited for, or raced to, the lease
            _point_at(fs, node_dir, planned.value)
            return summary
        with pinned_torch_threads(_driver_threads(node, executor_kind)):
            summary, manifest, shards = _execute(node, cfg, fingerprints, fs, out_path, planned, history, forced,
                                                 executor_kind)
        lease.check()
        _publish(fs, root_path, node, out_path, planned, manifest, shards)
    summary.reason = reason
    return summary


def _driver_threads(node: dag.Node, executor_kind: str) -> int:
    """`resources.torch_threads` of a node whose work runs in the driver (plan, shards, finalize), else 0.

    Only such nodes pin the driver's threads: they run alone (`scheduler.runs_in_driver`), so the process-wide
    setting is theirs while they run.
    """
    if not scheduler.runs_in_driver(node.config, executor_kind):
        return 0
    return int((node.config.get("resources") or {}).get("torch_threads") or 0)


def _point_at(fs: fsspec.AbstractFileSystem, node_dir: str, fingerprint: str) -> None:
    """Make `<node_dir>/current.json` name `fingerprint` when it names another output: a run whose config maps to
    an existing output (a reverted knob) leaves the node pointing at what it just ran, as a computing run does."""
    if read_pointer(fs, node_dir) != fingerprint:
        write_pointer(fs, node_dir, fingerprint)


def _up_to_date(fs: fsspec.AbstractFileSystem, node: dag.Node, out_path: str,
                cfg: Mapping[str, Any]) -> NodeSummary | None:
    """The "up to date" summary when the output's manifest exists (and `retry_failed` has nothing to redo)."""
    if not fs.exists(join(out_path, MANIFEST_NAME)):
        return None
    existing = StageOutput(fs.unstrip_protocol(out_path))
    if cfg.get("retry_failed") and existing.manifest["num_failed"]:
        return None
    return NodeSummary(node.name, "up to date", existing.num_samples, existing.manifest["num_failed"],
                       len(existing.manifest["shards"]), 0.0)


def _execute(node: dag.Node, cfg: Mapping[str, Any], fingerprints: Mapping[str, str], fs: fsspec.AbstractFileSystem,
             out_path: str, planned: NodeFingerprint, history: list[dict[str, Any]], forced: bool,
             executor_kind: str) -> tuple[NodeSummary, dict[str, Any], list[ShardDone]]:
    """Run the node's work; returns its summary, its manifest and its shards' markers (not yet published)."""
    if executor_kind == "ray":  # only nodes with work start Ray: an up-to-date run stays fast
        init_ray(cfg.get("ray") or {})
    started = time.perf_counter()
    root_path = out_path.rsplit("/", 2)[0]
    upstream = {port: StageOutput(fs.unstrip_protocol(join(root_path, up, fingerprints[up])))
                for port, up in node.inputs.items()}
    context = StageContext(node=node.name, seed=int(cfg["seed"]), config=node.config, upstream=upstream,
                           output_url=fs.unstrip_protocol(out_path), fingerprint=planned.value,
                           executor=executor_kind, forced=forced)
    stage = dag.stage_class(node.kind)(context)
    if not stage.sharded:
        extra = stage.run_unsharded()
        summary = NodeSummary(node.name, "ran", int(extra.get("num_samples", 0)), 0, 0, time.perf_counter() - started)
        return summary, {**_manifest(node, stage, planned, cfg, fingerprints, [], {}), **extra}, []
    plans = stage.plan()
    extra = planned.inputs.extra if planned.inputs else ""
    digests = {plan.index: incremental.items_digest(plan.items, extra) for plan in plans}
    shards, reused = _run_shards(stage, node, fs, out_path, plans, digests, history, planned, forced, executor_kind,
                                 bool(cfg.get("retry_failed", False)))
    summary = NodeSummary(node.name, "ran", sum(d.count for d in shards), sum(d.failed for d in shards),
                          len(shards), time.perf_counter() - started, reused)
    _check_failure_ratio(summary, float(cfg.get("max_failure_ratio", 0.0)))
    manifest = {**_manifest(node, stage, planned, cfg, fingerprints, shards, digests), **stage.finalize(shards)}
    return summary, manifest, shards


def _publish(fs: fsspec.AbstractFileSystem, root_path: str, node: dag.Node, out_path: str, planned: NodeFingerprint,
             manifest: dict[str, Any], shards: list[ShardDone]) -> None:
    """inputs.parquet, sizes.json, _info.json, then the manifest (atomically replaced), then the pointer."""
    incremental.write_inputs(fs, out_path, planned.inputs)
    write_stage_index(fs, out_path, manifest, shards)
    write_pointer(fs, join(root_path, node.name), planned.value)


def _run_shards(stage: Stage, node: dag.Node, fs: fsspec.AbstractFileSystem, out_path: str, plans: list[ShardPlan],
                digests: Mapping[int, str], history: list[dict[str, Any]], planned: NodeFingerprint, forced: bool,
                executor_kind: str, retry_failed: bool = False) -> tuple[list[ShardDone], int]:
    """Run the shards that are neither done here (a valid done-marker; with `retry_failed`, one without failed
    samples) nor reusable from the newest earlier output of the same base; return every shard's marker in plan
    order and the number of samples not computed now."""
    fingerprint = planned.value
    done: dict[int, ShardDone] = {}
    if not forced:
        markers = read_dones(fs, out_path, [plan.index for plan in plans], fingerprint)
        done = {index: marker for index, marker in markers.items() if not (retry_failed and marker.failed)}
        source = incremental.same_base(history, planned.base)
        done |= incremental.reuse_shards(fs, source, [p for p in plans if p.index not in done], digests, out_path,
                                         fingerprint, retry_failed)
    reused = sum(d.count for d in done.values())
    todo = [plan for plan in plans if plan.index not in done]
    resources = build_config(Resources, node.config.get("resources") or {}, f"{node.name}.resources")
    if todo:
        log.info("%s: %d of %d shards to run (%d already done)", node.name, len(todo), len(plans), len(done))
        make_executor(executor_kind).run(type(stage), stage.context, todo, resources,
                                         lambda d: done.__setitem__(int(d.shard), d))
    return [done[plan.index] for plan in plans], reused


def _check_failure_ratio(summary: NodeSummary, max_ratio: float) -> None:
    total = summary.samples + summary.failed
    if total and summary.failed / total > max_ratio:
        raise FailureRatioExceeded(
            f"{summary.node}: {summary.failed} of {total} samples failed ({summary.failed / total:.1%}), above "
            f"max_failure_ratio={max_ratio}; the reasons are in the shards' .parquet sidecars (status == 'failed')")


def _manifest(node: dag.Node, stage: Stage, planned: NodeFingerprint, cfg: Mapping[str, Any],
              fingerprints: Mapping[str, str], shards: list[ShardDone], digests: Mapping[int, str]) -> dict[str, Any]:
    inputs = planned.inputs
    return {
        "node": node.name, "kind": node.kind, "fingerprint": planned.value, "base": planned.base,
        "schema": stage.schema, "code_version": stage.code_version, "config": node.config, "seed": cfg["seed"],
        "identities": stage.identities(),
        "input": None if inputs is None else {"digest": inputs.digest, "extra": inputs.extra,
                                              "items": len(inputs.items)},
        "upstream": {port: {"node": up, "fingerprint": fingerprints[up]} for port, up in node.inputs.items()},
        "shards": [{"name": f"{d.shard}.tar", "count": d.count, "failed": d.failed, "sha256": d.sha256,
                    "bytes": d.bytes, "items": digests.get(int(d.shard), "")} for d in shards],
        "num_samples": sum(d.count for d in shards), "num_failed": sum(d.failed for d in shards),
        "versions": _versions(), **stage.manifest_extra(),
    }


def _versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def run(cfg: Mapping[str, Any]) -> list[NodeSummary]:
    """Run the selected nodes of a resolved config, independent ones at once; returns one summary per node."""
    nodes = dag.build_nodes(cfg)
    selected = dag.select(nodes, cfg.get("stages"))
    forced = set(cfg.get("force") or [])
    unknown = sorted(forced - set(nodes))
    if unknown:
        raise ConfigError(f"force={unknown} are not nodes of this config; nodes: {sorted(nodes)}")
    fingerprints = plan_fingerprints(nodes, cfg)
    root = output_root(cfg)
    fs, root_path = fsspec.core.url_to_fs(root)
    check_inputs_exist(nodes, selected, fingerprints, fs, root_path)
    options, executor_kind = scheduler.run_options(cfg), cfg.get("executor", "ray")
    if executor_kind == "ray" and not cfg.get("dry_run") and any(
            name in forced or _up_to_date(fs, nodes[name], join(root_path, name, fingerprints[name]), cfg) is None
            for name in selected):
        init_ray(cfg.get("ray") or {})  # on the main thread: a Ray started from a node's thread cannot be shut down
    with Board(options.progress, options.progress_interval_s) as board:
        def run_one(name: str, abort: threading.Event) -> NodeSummary:
            record_dir = (fs, join(root_path, name, fingerprints[name]))
            with board.node_run(name, options.stall_timeout_s, abort, record_dir) as node_run:
                summary = run_node(nodes[name], cfg, fingerprints, root, name in forced, executor_kind)
                node_run.status = summary.status
            board.print_line(summary.line())
            return summary

        results = scheduler.run_dag(selected, {name: nodes[name].inputs.values() for name in selected}, run_one,
                                    options.max_concurrent_nodes,
                                    lambda name: scheduler.runs_in_driver(nodes[name].config, executor_kind),
                                    contained=(FailureRatioExceeded, ShardsFailed))
    return [results[name] for name in selected]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit codes: 0 ok, 1 failure ratio exceeded or shards failed, 2 bad configuration, missing
    input, Ray unavailable or a request the cluster cannot place, 3 another run holds an output's lease (with
    `lease.wait_s` spent)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import yaml
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    preset, overrides = parse_argv(sys.argv[1:] if argv is None else argv)
    raw = None
    try:
        raw = compose_config(preset, overrides)
        cfg = OmegaConf.to_container(raw, resolve=True)
        build_config(LeaseConfig, cfg.get("lease"), "lease")  # the run-level knobs fail before any work too
        started = time.perf_counter()
        summaries = run(cfg)
    except (ConfigError, HydraException, OmegaConfBaseException, yaml.YAMLError) as error:
        print(f"error: {error}{config_hint(error, raw, overrides)}", file=sys.stderr)
        return 2
    except (FailureRatioExceeded, ShardsFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (LeaseHeld, LeaseLost) as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    if cfg.get("dry_run"):
        print(f"dry run: {len(summaries)} stage(s) checked, nothing written", flush=True)
        return 0
    print(f"done: {len(summaries)} stage(s) in {time.perf_counter() - started:.1f} s; outputs under "
          f"{output_root(cfg)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
