"""The driver's plan: which nodes a run needs and their fingerprints, computed once per run before any work.

`plan_fingerprints` builds each needed node's stage on the driver (validating its config), lists its input items
(`Stage.input_identity`: one listing per folder) and keeps the fingerprint's parts, so that `run_node` neither
lists the inputs again nor recomputes identities (`planned_fingerprint`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pipeline import dag
from pipeline.config import ConfigError
from pipeline.fingerprint import NodeFingerprint, describe
from pipeline.stage import Stage, StageContext

log = logging.getLogger("pipeline")

_PLANNED: dict[tuple[str, str], NodeFingerprint] = {}  # (node, fingerprint) -> its parts, from the last planning


def plan_fingerprints(nodes: Mapping[str, dag.Node], cfg: Mapping[str, Any]) -> dict[str, str]:
    """The fingerprint of every node the selection needs (selected ones and their ancestors), upstream first.

    Also validates their configs before any work (ConfigError); other nodes' errors are logged as warnings, and
    their input items are not listed, so a preset's other data roots need not exist.
    """
    needed = needed_nodes(nodes, cfg.get("stages"))
    fingerprints: dict[str, str] = {}
    _PLANNED.clear()
    for name in dag.topological_order(nodes):
        if name not in needed:
            warn_if_invalid(nodes[name], cfg)
            continue
        planned = node_fingerprint(nodes[name], driver_stage(nodes[name], cfg), cfg, fingerprints)
        fingerprints[name] = planned.value
        _PLANNED[(name, planned.value)] = planned
    return fingerprints


def warn_if_invalid(node: dag.Node, cfg: Mapping[str, Any]) -> None:
    """A node this run does not need is checked too, but its errors only warn (`stages=[wordgrid] vocab=voc_20`
    makes VOC word grids even though the preset's toy-world nodes cannot use that vocabulary)."""
    try:
        driver_stage(node, cfg)
    except ConfigError as error:
        log.warning("%s (not selected, not run): %s", node.name, error)


def needed_nodes(nodes: Mapping[str, dag.Node], stages: list[str] | None) -> set[str]:
    """The selected nodes and every node upstream of them."""
    needed: set[str] = set()
    pending = list(dag.select(nodes, stages))
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(nodes[name].inputs.values())
    return needed


def driver_stage(node: dag.Node, cfg: Mapping[str, Any]) -> Stage:
    data = node.config.get("data")
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{node.name}.data={data!r} is not a mapping: an input adapter is a kind and its options, "
                          f"e.g. '{node.name}.data={{kind:folder,root:/path/to/images}}' (in quotes: a shell expands "
                          "unquoted braces into two arguments)")
    return dag.stage_class(node.kind)(StageContext(node=node.name, seed=int(cfg["seed"]), config=node.config))


def node_fingerprint(node: dag.Node, stage: Stage, cfg: Mapping[str, Any],
                     fingerprints: Mapping[str, str]) -> NodeFingerprint:
    """The parts of one node's fingerprint: its description and its input identity (one listing per folder)."""
    upstream = {port: fingerprints[up] for port, up in sorted(node.inputs.items())}
    description = describe(node.kind, stage.code_version, {**node.config, "seed": cfg["seed"]}, upstream,
                           stage.identities())
    return NodeFingerprint(description, stage.input_identity())


def planned_fingerprint(node: dag.Node, cfg: Mapping[str, Any], fingerprints: Mapping[str, str]) -> NodeFingerprint:
    """The parts of `fingerprints[node.name]` from the last `plan_fingerprints`, recomputed when absent."""
    planned = _PLANNED.get((node.name, fingerprints[node.name]))
    return planned or node_fingerprint(node, driver_stage(node, cfg), cfg, fingerprints)


