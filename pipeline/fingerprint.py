"""What makes a stage's output up to date (design contract 2).

fingerprint = sha256 over the canonical JSON of
    {stage kind, the stage's CODE_VERSION, its resolved node config minus the keys that cannot change results,
     the identities of its model weights, the fingerprints of the upstream outputs it reads}
    plus, for nodes with an input adapter, the digest of its input identity (every item's path, size and
    mtime/ETag from one listing per folder: `pipeline.data.records.InputIdentity`).

The same hash without the input digest is the node's *base*: two outputs with equal bases differ only in their
input items, so the newer one may reuse the older one's shards of unchanged items (`pipeline.incremental`).
Bulk data is never re-hashed: upstream outputs enter through their manifests' fingerprints, weights through
`pipeline.models.checkpoints.weights_identity` (a file checksum cached beside the file, or a pinned tag).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.data.records import InputIdentity

# Node-config keys that never change what a stage writes: where it runs and how fast.
NON_RESULT_KEYS = frozenset({"resources", "inputs"})
# Keys holding weight references (paths / URLs / tags): their content enters through the stage's identities
# (a checksum or pinned tag), so moving a checkpoint or a checkout does not invalidate outputs.
WEIGHT_REF_KEYS = frozenset({"pretrained", "checkpoint", "weights"})
# Nested keys (at any depth) that move data faster but never change a value: ``pin_memory`` (page-locked host copies,
# `pipeline.models.accel`). Switches that change float rounding (``sdpa``, ``compile``, ``channels_last``,
# ``precision``) and call-size knobs (``*_batch_size``: CPU matmul kernels depend on the number of rows) stay in.
RESOURCE_KEYS = frozenset({"pin_memory"})
FINGERPRINT_LENGTH = 16


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings on every machine."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def without_weight_refs(value: Any, keys: frozenset[str] = WEIGHT_REF_KEYS) -> Any:
    """`value` with every entry named in `keys` (default WEIGHT_REF_KEYS) removed from nested mappings and lists."""
    if isinstance(value, Mapping):
        return {k: without_weight_refs(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list | tuple):
        return [without_weight_refs(v, keys) for v in value]
    return value


def result_config(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a node's resolved config that can change its output (weights enter via identities)."""
    top = {key: value for key, value in node_config.items() if key not in NON_RESULT_KEYS}
    return without_weight_refs(top, WEIGHT_REF_KEYS | RESOURCE_KEYS)


def describe(kind: str, code_version: str, node_config: Mapping[str, Any], upstream: Mapping[str, str],
             model_ids: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The canonical description of one node that its base fingerprint hashes (see `stage_fingerprint`)."""
    return {
        "kind": kind,
        "code_version": code_version,
        "config": result_config(node_config),
        "upstream": dict(upstream),
        "models": dict(model_ids or {}),
    }


def digest(value: Any) -> str:
    """The first FINGERPRINT_LENGTH hex digits of the sha256 of `value`'s canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:FINGERPRINT_LENGTH]


def stage_fingerprint(
    kind: str,
    code_version: str,
    node_config: Mapping[str, Any],
    upstream: Mapping[str, str],
    model_ids: Mapping[str, str] | None = None,
    inputs: InputIdentity | None = None,
) -> str:
    """The fingerprint directory name of one node's output.

    Args:
        kind: stage kind ("wordgrid", "pseudolabel", ...).
        code_version: the stage module's CODE_VERSION; bump it when a change alters outputs.
        node_config: the node's resolved config (plain dict).
        upstream: input port -> fingerprint of the upstream output read through it.
        model_ids: model role -> weights identity ("sha256:...", "tag:openai", "random-init").
        inputs: the identity of the node's input items (`Stage.input_identity`); None for nodes without an adapter.

    Returns:
        The first 16 hex digits of the sha256 of the canonical description.
    """
    return NodeFingerprint(describe(kind, code_version, node_config, upstream, model_ids), inputs).value


@dataclass(frozen=True)
class NodeFingerprint:
    """A node's fingerprint in its two parts.

    Attributes:
        description: `describe(...)`: kind, code version, result config, upstream fingerprints, weight identities.
        inputs: the identity of the node's input items, or None when the node has no input adapter.
    """

    description: dict[str, Any]
    inputs: InputIdentity | None = None

    @property
    def base(self) -> str:
        """The fingerprint without the input identity: equal bases = same code, config, weights and upstream."""
        return digest(self.description)

    @property
    def value(self) -> str:
        """The output directory name; equals `base` for nodes without an input adapter."""
        if self.inputs is None:
            return self.base
        return digest({**self.description, "inputs": self.inputs.digest})
