"""What makes a stage's output up to date (design contract 2).

fingerprint = sha256 over the canonical JSON of
    {stage kind, the stage's CODE_VERSION, its resolved node config minus the keys that cannot change results,
     the identities of its model weights, the fingerprints of the upstream outputs it reads}.

Bulk data is never re-hashed: upstream outputs enter through their manifests' fingerprints, weights through
`pipeline.models.checkpoints.weights_identity` (a file checksum cached beside the file, or a pinned tag).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Node-config keys that never change what a stage writes: where it runs and how fast.
NON_RESULT_KEYS = frozenset({"resources", "inputs"})
# Keys holding weight references (paths / URLs / tags): their content enters through the stage's identities
# (a checksum or pinned tag), so moving a checkpoint or a checkout does not invalidate outputs.
WEIGHT_REF_KEYS = frozenset({"pretrained", "checkpoint", "weights"})
FINGERPRINT_LENGTH = 16


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings on every machine."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def without_weight_refs(value: Any) -> Any:
    """`value` with every WEIGHT_REF_KEYS entry removed from nested mappings and lists."""
    if isinstance(value, Mapping):
        return {k: without_weight_refs(v) for k, v in value.items() if k not in WEIGHT_REF_KEYS}
    if isinstance(value, list | tuple):
        return [without_weight_refs(v) for v in value]
    return value


def result_config(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a node's resolved config that can change its output (weights enter via identities)."""
    return without_weight_refs({key: value for key, value in node_config.items() if key not in NON_RESULT_KEYS})


def stage_fingerprint(
    kind: str,
    code_version: str,
    node_config: Mapping[str, Any],
    upstream: Mapping[str, str],
    model_ids: Mapping[str, str] | None = None,
) -> str:
    """The fingerprint directory name of one node's output.

    Args:
        kind: stage kind ("wordgrid", "pseudolabel", ...).
        code_version: the stage module's CODE_VERSION; bump it when a change alters outputs.
        node_config: the node's resolved config (plain dict).
        upstream: input port -> fingerprint of the upstream output read through it.
        model_ids: model role -> weights identity ("sha256:...", "tag:openai", "random-init").

    Returns:
        The first 16 hex digits of the sha256 of the canonical description.
    """
    description = {
        "kind": kind,
        "code_version": code_version,
        "config": result_config(node_config),
        "upstream": dict(upstream),
        "models": dict(model_ids or {}),
    }
    return hashlib.sha256(canonical_json(description).encode()).hexdigest()[:FINGERPRINT_LENGTH]
