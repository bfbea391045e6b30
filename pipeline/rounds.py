"""Self-training rounds: `rounds: N` on a student train node becomes N (relabel -> student) node pairs.

A self-training path in a preset is a `selftrain` node (the teacher's labels; port `model`) and a student `train`
node reading them (port `images`, starting from port `init`). Round 1 is those two nodes as written; round r >= 2
adds two nodes, copies of them, where the previous round's student is the new teacher and initialisation::

    selftrain    (model: train_ifseg)      -> train_ifseg_st    (images: selftrain,    init: train_ifseg)
    selftrain_r2 (model: train_ifseg_st)   -> train_ifseg_st_r2 (images: selftrain_r2, init: train_ifseg_st)
    selftrain_r3 (model: train_ifseg_st_r2) -> ...

`rounds` itself is removed from every node's config, so a round's fingerprint depends on its own knobs and its
upstream rounds only: raising N re-runs nothing that is finished. Nodes that read the student (eval, export)
name the round they mean (`train_ifseg_st_r3` for round 3); the names are fixed per round for the same reason.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pipeline.config import ConfigError

ROUNDS_KEY = "rounds"


def round_names(relabel: str, student: str, r: int) -> tuple[str, str]:
    """The (selftrain, train) node names of round r (round 1: the preset's own names)."""
    return (relabel, student) if r == 1 else (f"{relabel}_r{r}", f"{student}_r{r}")


def expand_rounds(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The run config with every node's `rounds` expanded into node pairs and removed (see the module doc)."""
    expanded: dict[str, Any] = {}
    for name, value in cfg.items():
        if not (isinstance(value, Mapping) and "stage" in value):
            expanded[name] = value
            continue
        node = {k: v for k, v in value.items() if k != ROUNDS_KEY}
        expanded[name] = node
        rounds = value.get(ROUNDS_KEY, 1)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"{name}.rounds={rounds!r}: must be an integer >= 1 (self-training rounds)")
        if rounds > 1:
            expanded.update(_later_rounds(cfg, name, node, rounds))
    return expanded


def _later_rounds(cfg: Mapping[str, Any], student: str, node: Mapping[str, Any], rounds: int) -> dict[str, Any]:
    """Nodes of rounds 2..`rounds` of the self-training path ending in `student`."""
    inputs = dict(node.get("inputs") or {})
    relabel = inputs.get("images")
    labeller = cfg.get(relabel) if isinstance(relabel, str) else None
    if node.get("stage") != "train" or not isinstance(labeller, Mapping) or labeller.get("stage") != "selftrain":
        raise ConfigError(f"{student}.rounds={rounds}: rounds apply to a train node whose inputs.images names a "
                          f"selftrain node (the student of a self-training path); {student}.inputs={inputs}")
    nodes: dict[str, Any] = {}
    previous = student
    for r in range(2, rounds + 1):
        relabel_r, student_r = round_names(relabel, student, r)
        for new in (relabel_r, student_r):
            if new in cfg:
                raise ConfigError(f"{student}.rounds={rounds} would add node {new!r}, which the config already has")
        nodes[relabel_r] = {**copy.deepcopy(dict(labeller)),
                            "inputs": {**dict(labeller.get("inputs") or {}), "model": previous}}
        nodes[student_r] = {**copy.deepcopy(dict(node)), "inputs": {**inputs, "images": relabel_r, "init": previous}}
        previous = student_r
    return nodes
