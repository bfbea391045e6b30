"""Only what changed is computed: reuse of whole shards when only a node's input items changed (contract 2).

Two outputs of one node with the same *base* fingerprint (`pipeline.fingerprint.NodeFingerprint.base`: same code
version, result config, weights and upstream outputs) differ only in their input items. Shards are cut by content
(`pipeline.stage.shard_plans`), so most shards of the new plan hold exactly the items of a shard of the older
output; the manifest records each shard's *items digest* (the identities of its items, in order, and the input's
adapter-wide identity), and a new shard whose digest the newest earlier output of the same base already has is
published from it (`pipeline.shards.reuse_shard`: hard link or server-side copy, then a new done-marker) instead of
being computed. Its tar bytes, sidecar and `extra` aggregates are the ones a from-scratch run would write: a shard's
output depends only on the stage's base and the shard's items.

Each output also keeps `inputs.parquet` (item name, identity), from which `pipeline.explain` tells which items
were added, removed or changed since an earlier output.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.listing import TIME_KEYS
from pipeline.data.records import InputIdentity, ItemRef, ref_identity
from pipeline.fingerprint import digest
from pipeline.shards import MANIFEST_NAME, ShardDone, join, read_dones, reuse_shard, write_atomic
from pipeline.stage import ShardPlan

log = logging.getLogger(__name__)

INPUTS_NAME = "inputs.parquet"
INPUTS_SCHEMA = pa.schema([("name", pa.string()), ("identity", pa.string())])


def item_identity(item: Any) -> Any:
    """A JSON-able description of one plan item: an `ItemRef` by its identity (sources and listing version),
    tuples element by element, dataclasses by their fields, anything else as itself (indices, URLs)."""
    if isinstance(item, ItemRef):
        return ref_identity(item)
    if isinstance(item, tuple | list):
        return [item_identity(part) for part in item]
    if is_dataclass(item) and not isinstance(item, type):
        return item_identity(tuple(asdict(item).values()))
    return item


def items_digest(items: Iterable[Any], extra: str = "") -> str:
    """The digest of a shard's items, in order, with the input's adapter-wide identity `extra`."""
    return digest({"extra": extra, "items": [item_identity(item) for item in items]})


def earlier_outputs(fs: fsspec.AbstractFileSystem, node_dir: str, exclude: str = "") -> list[dict[str, Any]]:
    """The finished outputs of a node, newest manifest first (one listing of `node_dir`, one read per output).

    Each manifest gets `"_path"` (its directory) added. Unreadable or unfinished directories are skipped.
    """
    try:
        entries = fs.ls(node_dir, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        path = entry["name"].rstrip("/")
        if entry.get("type") != "directory" or path.rsplit("/", 1)[-1] == exclude:
            continue
        try:
            manifest = json.loads(fs.cat_file(join(path, MANIFEST_NAME)))
            modified = _modified(fs.info(join(path, MANIFEST_NAME)))
        except (FileNotFoundError, ValueError):
            continue
        found.append((modified, path, {**manifest, "_path": path}))
    return [manifest for _, _, manifest in sorted(found, key=lambda entry: entry[:2], reverse=True)]


def _modified(info: Mapping[str, Any]) -> float:
    for key in TIME_KEYS:
        value = info.get(key)
        if value is None:
            continue
        return value.timestamp() if hasattr(value, "timestamp") else float(value)
    return 0.0


def same_base(history: Sequence[Mapping[str, Any]], base: str) -> Mapping[str, Any] | None:
    """The newest earlier output with base fingerprint `base`, or None."""
    return next((manifest for manifest in history if manifest.get("base") == base), None)


def reuse_shards(fs: fsspec.AbstractFileSystem, source: Mapping[str, Any] | None, plans: Sequence[ShardPlan],
                 digests: Mapping[int, str], out_path: str, fingerprint: str,
                 retry_failed: bool = False) -> dict[int, ShardDone]:
    """Publish, from the earlier output `source` (a manifest from `earlier_outputs`), every planned shard whose
    items digest it has; returns plan index -> the new done-marker. Shards whose marker is invalid are skipped,
    and with `retry_failed` so are shards that recorded failed samples."""
    if source is None:
        return {}
    by_digest = {entry["items"]: entry for entry in source.get("shards", []) if entry.get("items")}
    wanted = {plan.index: int(by_digest[digests[plan.index]]["name"].split(".")[0])
              for plan in plans if digests[plan.index] in by_digest}
    markers = read_dones(fs, source["_path"], wanted.values(), source["fingerprint"])
    reused: dict[int, ShardDone] = {}
    for index, source_index in wanted.items():
        marker = markers.get(source_index)
        if marker is None or (retry_failed and marker.failed):
            continue
        reused[index] = reuse_shard(fs, source["_path"], marker, out_path, index, fingerprint)
    if reused:
        log.info("reused %d shard(s) of unchanged items from %s", len(reused), source["_path"])
    return reused


def write_inputs(fs: fsspec.AbstractFileSystem, out_path: str, identity: InputIdentity | None) -> None:
    """Write `inputs.parquet` (item name, identity) beside the shards; nothing for nodes without an adapter."""
    if identity is None:
        return
    table = pa.table({"name": list(identity.items), "identity": list(identity.items.values())}, schema=INPUTS_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_atomic(fs, join(out_path, INPUTS_NAME), buffer.getvalue())


def read_inputs(fs: fsspec.AbstractFileSystem, out_path: str) -> dict[str, str] | None:
    """Item name -> identity recorded by an earlier output, or None when it recorded none."""
    try:
        table = pq.read_table(io.BytesIO(fs.cat_file(join(out_path, INPUTS_NAME))))
    except (FileNotFoundError, pa.ArrowInvalid):
        return None
    return dict(zip(table.column("name").to_pylist(), table.column("identity").to_pylist(), strict=True))
