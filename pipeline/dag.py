"""The stage registry and the DAG of nodes a preset wires from them.

A node is a top-level config key whose value has a `stage:` entry naming a stage kind, and `inputs:`
mapping the kind's input ports to upstream node names, e.g.::

    wordgrid:    {stage: wordgrid, inputs: {}, num_samples: 32000, ...}
    train_ifseg: {stage: train, inputs: {grids: wordgrid}, method: ifseg, ...}
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError
from pipeline.rounds import expand_rounds
from pipeline.stage import Stage

# kind -> "module:Class"; imported lazily so a run only imports the stages it uses.
STAGES: dict[str, str] = {
    "wordgrid": "stages.wordgrid:WordGridStage",
    "pseudolabel": "stages.pseudolabel:PseudoLabelStage",
    "selftrain": "stages.selftrain:SelfTrainStage",
    "train": "stages.train:TrainStage",
    "eval": "stages.evaluate:EvalStage",
    "export": "stages.export:ExportStage",
}


def stage_class(kind: str) -> type[Stage]:
    """The Stage subclass registered for `kind`."""
    if kind not in STAGES:
        raise ConfigError(f"unknown stage kind {kind!r}; registered kinds: {sorted(STAGES)}")
    module_name, class_name = STAGES[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


@dataclass(frozen=True)
class Node:
    """One node of the DAG: its name, stage kind, upstream ports and resolved config."""

    name: str
    kind: str
    inputs: dict[str, str]
    config: dict[str, Any]


def build_nodes(cfg: Mapping[str, Any]) -> dict[str, Node]:
    """Collect the nodes of a resolved run config (self-training `rounds` expanded: `pipeline.rounds`) and check
    that every input names a node."""
    cfg = expand_rounds(cfg)
    nodes = {
        name: Node(name, value["stage"], dict(value.get("inputs") or {}), dict(value))
        for name, value in cfg.items()
        if isinstance(value, Mapping) and "stage" in value
    }
    for node in nodes.values():
        ports = stage_class(node.kind).input_ports
        missing_ports = sorted(set(ports) - set(node.inputs))
        if missing_ports:
            raise ConfigError(f"{node.name}.inputs lacks port(s) {missing_ports} required by stage "
                              f"{node.kind!r}; set {node.name}.inputs.<port>=<node>")
        for port, upstream in node.inputs.items():
            if upstream not in nodes:
                raise ConfigError(f"{node.name}.inputs.{port}={upstream!r} is not a node of this config; "
                                  f"nodes: {sorted(nodes)}")
    return nodes


def topological_order(nodes: Mapping[str, Node]) -> list[str]:
    """Node names with every node after its inputs; ties keep config order. Raises on cycles."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ConfigError(f"cycle in the stage DAG: {' -> '.join((*path, name))}")
        state[name] = "visiting"
        for upstream in nodes[name].inputs.values():
            visit(upstream, (*path, name))
        state[name] = "done"
        order.append(name)

    for name in nodes:
        visit(name, ())
    return order


def select(nodes: Mapping[str, Node], stages: list[str] | None) -> list[str]:
    """The nodes to run, in execution order: all when `stages` is None, else exactly those named."""
    order = topological_order(nodes)
    if stages is None:
        return order
    unknown = sorted(set(stages) - set(nodes))
    if unknown:
        raise ConfigError(f"stages={unknown} are not nodes of this config; nodes: {order}")
    return [name for name in order if name in stages]
