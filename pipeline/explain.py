"""Why a node would run: its fingerprint's parts against the newest earlier output of the same node.

`dry_run=true` prints these reasons for every selected node and writes nothing; a normal run prints them on the
node's summary line. Compared: code version, result config (dotted keys, old -> new), weight identities,
upstream fingerprints, and the input items (added / removed / changed, from the earlier output's
`inputs.parquet`). The earlier output compared against is the newest one with the same base fingerprint when one
exists (then only the inputs differ, and its shards of unchanged items are reused), else the newest one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import fsspec

from pipeline.data.records import InputIdentity
from pipeline.fingerprint import NodeFingerprint, result_config
from pipeline.incremental import read_inputs, same_base
from pipeline.lease import LEASE_NAME, read_holder
from pipeline.shards import MANIFEST_NAME, join

MAX_VALUE_CHARS = 40
MAX_EXAMPLES = 2


def why(fs: fsspec.AbstractFileSystem, node: str, planned: NodeFingerprint, history: Sequence[Mapping[str, Any]],
        out_path: str, forced: bool) -> str:
    """The reason a node with work runs: forced, failures to retry, a resumed crash, or `reasons` joined by "; "."""
    if forced:
        return "forced"
    if fs.exists(join(out_path, MANIFEST_NAME)):
        return "retry_failed: the output recorded failed samples"
    resumed = len(fs.glob(join(out_path, "*.done.json")))
    found = "; ".join(reasons(fs, node, planned, history))
    if resumed:
        found = f"resuming ({resumed} shard(s) already done); {found}"
    holder = read_holder(fs, join(out_path, LEASE_NAME))
    return f"{found}; another run is writing it now: {holder.describe()}" if holder else found


def reasons(fs: fsspec.AbstractFileSystem, node: str, planned: NodeFingerprint,
            history: Sequence[Mapping[str, Any]]) -> list[str]:
    """What differs between `planned` and the earlier output it is compared with; `["no earlier output"]` when the
    node never finished before."""
    if not history:
        return ["no earlier output"]
    old = same_base(history, planned.base) or history[0]
    new = planned.description
    found = []
    if old.get("code_version") != new["code_version"]:
        found.append(f"code version {old.get('code_version')} -> {new['code_version']}")
    found += _config_changes(node, old, new["config"])
    found += [f"weights {role}: {_short(old.get('identities', {}).get(role))} -> {_short(value)}"
              for role, value in sorted(new["models"].items()) if old.get("identities", {}).get(role) != value]
    old_upstream = old.get("upstream", {})
    found += [f"upstream {port} ({old_upstream.get(port, {}).get('node', '?')}) changed"
              for port, fingerprint in sorted(new["upstream"].items())
              if old_upstream.get(port, {}).get("fingerprint") != fingerprint]
    found += _input_changes(fs, old, planned.inputs)
    return found or [f"fingerprint {old.get('fingerprint')} -> {planned.value} (an older fingerprint scheme)"]


def _config_changes(node: str, old: Mapping[str, Any], new_config: Mapping[str, Any]) -> list[str]:
    old_values = {**old.get("config", {}), **({"seed": old["seed"]} if "seed" in old else {})}
    before, after = _flatten(result_config(old_values)), _flatten(new_config)
    if "seed" not in old:
        after.pop("seed", None)
    return [f"{node}.{key}: {_short(before.get(key, '<unset>'))} -> {_short(after.get(key, '<unset>'))}"
            for key in sorted(set(before) | set(after)) if before.get(key, "<unset>") != after.get(key, "<unset>")]


def _input_changes(fs: fsspec.AbstractFileSystem, old: Mapping[str, Any], inputs: InputIdentity | None) -> list[str]:
    old_input = old.get("input") or {}
    if inputs is None or old_input.get("digest") == inputs.digest:
        return []
    found = []
    if old_input.get("extra", "") != inputs.extra:
        found.append("inputs: the adapter-wide identity changed (e.g. a COCO JSON's categories)")
    previous = read_inputs(fs, old["_path"])
    if previous is None:
        return [*found, f"inputs: {len(inputs.items)} items (the earlier output recorded no listing)"]
    added = sorted(set(inputs.items) - set(previous))
    removed = sorted(set(previous) - set(inputs.items))
    changed = sorted(name for name, identity in inputs.items.items() if previous.get(name, identity) != identity)
    if added or removed or changed:
        counts = ", ".join(f"{len(names)} {what}{_examples(names)}"
                           for what, names in (("added", added), ("removed", removed), ("changed", changed)))
        found.append(f"inputs: {counts} of {len(inputs.items)} items")
    return found


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {"a.b.c": leaf}; lists stay leaves."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat |= _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def _examples(names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:MAX_EXAMPLES])
    return f" ({shown}{', ...' if len(names) > MAX_EXAMPLES else ''})"
