"""Reading WebDataset tars into samples, torch-free: the reader under `pipeline.shards.StageOutput`, the torch
dataset (`pipeline.shard_dataset`), the trainers' batch streams, the shards input adapter and the exporters.

Every member is checked before its name is used (`check_member`): a name with a `..` component, an absolute
path (also `C:` / backslash forms), a symbolic or hard link, a device or FIFO, or a member larger than
`max_member_bytes` raises `UnsafeShardError` naming the shard and the member. A sample key that appears again
after another key (members of one sample must be contiguous) or a member repeated inside one sample is refused
the same way. Directory entries are skipped; files without an extension are skipped (as webdataset does).

`verify_shard` checks a tar's sha256 against the one its stage recorded (`manifest.json` beside the tar, else
the shard's `NNNNNN.done.json`), before any sample is read.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec

DEFAULT_MAX_MEMBER_BYTES = 1 << 30  # 1 GiB: far above any image or label map, far below a disk-filling member
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20


class UnsafeShardError(ValueError):
    """A shard that must not be read: unsafe member, duplicate key or checksum mismatch (names shard and member)."""


def split_member_name(member: str) -> tuple[str, str]:
    """``"dir/abc.label.png"`` -> ``("dir/abc", "label.png")``: the WebDataset rule (first dot of the base name)."""
    folder, base = posixpath.split(member)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, extension


def check_member(member: tarfile.TarInfo, url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> bool:
    """True for a regular file to read, False for a directory entry to skip; raises `UnsafeShardError` otherwise."""
    name = member.name
    if name.startswith("/") or _DRIVE.match(name) or "\\" in name:
        raise UnsafeShardError(f"{url}: member {name!r} has an absolute path (or a backslash); refused")
    if ".." in name.split("/"):
        raise UnsafeShardError(f"{url}: member {name!r} climbs out of the shard with '..'; refused")
    if member.issym() or member.islnk():
        raise UnsafeShardError(f"{url}: member {name!r} is a {'symbolic' if member.issym() else 'hard'} link "
                               f"(to {member.linkname!r}); links are refused")
    if member.isdir():
        return False
    if not member.isfile():
        raise UnsafeShardError(f"{url}: member {name!r} is not a regular file (device, FIFO, ...); refused")
    if member.size > max_member_bytes:
        raise UnsafeShardError(f"{url}: member {name!r} is {member.size} bytes, above max_member_bytes="
                               f"{max_member_bytes}; refused")
    return True


def iter_tar_samples(url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                     sha256: str | None = None) -> Iterator[dict[str, Any]]:
    """Group a tar's members into samples ``{"__key__", "__url__", ext: bytes}`` (see the module doc for checks).

    Args:
        url: local path or fsspec URL of the tar.
        max_member_bytes: largest accepted member.
        sha256: when given, the tar is hashed first and must match (`verify_shard`), before anything is yielded.
    """
    if sha256 is not None:
        verify_shard(url, sha256)
    with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        current: dict[str, Any] | None = None
        finished: set[str] = set()
        for member in tar:
            if not check_member(member, url, max_member_bytes):
                continue
            key, ext = split_member_name(member.name)
            if not ext:
                continue
            if current is None or current["__key__"] != key:
                if current is not None:
                    finished.add(current["__key__"])
                    yield current
                if key in finished:
                    raise UnsafeShardError(f"{url}: member {member.name!r} repeats sample key {key!r} after other "
                                           "samples (one sample's members must be contiguous); refused")
                current = {"__key__": key, "__url__": url}
            if ext in current:
                raise UnsafeShardError(f"{url}: member {member.name!r} appears twice in sample {key!r}; refused")
            current[ext] = tar.extractfile(member).read()
        if current is not None:
            yield current


def file_sha256(url: str) -> str:
    """Hex sha256 of a file's bytes, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_sha256(url: str) -> str | None:
    """The sha256 a stage recorded for tar `url`: its entry in `manifest.json` beside it, else its done-marker."""
    fs, path = fsspec.core.url_to_fs(url)
    folder, name = posixpath.split(path)
    try:
        manifest = json.loads(fs.cat_file(posixpath.join(folder, "manifest.json")))
        by_name = {s["name"]: s.get("sha256") for s in manifest.get("shards", [])}
        if by_name.get(name):
            return by_name[name]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        pass
    try:
        return json.loads(fs.cat_file(posixpath.join(folder, name.rsplit(".", 1)[0] + ".done.json")))["sha256"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


def verify_shard(url: str, sha256: str | None = None) -> None:
    """Raise `UnsafeShardError` unless the tar's bytes hash to `sha256` (None: the recorded one, which must exist)."""
    expected = sha256 if sha256 is not None else recorded_sha256(url)
    if expected is None:
        raise UnsafeShardError(f"{url}: no recorded sha256 (no manifest.json entry, no done-marker) to verify against")
    actual = file_sha256(url)
    if actual != expected:
        raise UnsafeShardError(f"{url}: sha256 {actual} differs from the recorded {expected}; the shard was changed "
                               "or corrupted after it was written")


def split_for_rank(items: list[Any], rank: int, world_size: int, worker: int, num_workers: int) -> list[Any]:
    """The slice of `items` that (rank, worker) reads: round-robin over rank*num_workers + worker."""
    slot, slots = rank * num_workers + worker, world_size * num_workers
    return items[slot::slots]
