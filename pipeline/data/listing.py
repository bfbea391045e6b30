"""Cheap file listing over fsspec (local folders and remote URLs alike); no file is opened.

One `find(detail=True)` per folder gives every file's relative path, size and version tag (ETag or modification
time): the input identity of a node is built from these alone, never from file bytes.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

VERSION_KEYS = ("ETag", "etag", "generation", "VersionId", "version_id", "md5Hash")
"""Listing fields that change whenever an object is rewritten (S3, GCS, Azure), preferred in this order."""
TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")
"""Modification-time fields, used when a store gives no version tag (local disk, fsspec's memory filesystem)."""


def join_url(root: str, *parts: str) -> str:
    """Join a local path or URL with relative parts, skipping empty parts (``join_url("s3://b", "", "x")``)."""
    clean = [part.strip("/") for part in parts if part and part.strip("/") not in ("", ".")]
    if not clean:
        return root
    return posixpath.join(root.rstrip("/") if root not in ("/", "") else root, *clean)


def _to_source(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A string :func:`fsspec.open` accepts: plain path for local files, full URL otherwise."""
    if isinstance(fs, LocalFileSystem):
        return os.path.normpath(path)
    return fs.unstrip_protocol(path)


def file_version(info: Mapping[str, Any]) -> str:
    """A file's identity from its listing entry alone (never its bytes): size plus the store's version tag.

    Object stores give an ETag / generation / version id, which changes whenever the object is rewritten; local
    disks and fsspec's memory filesystem give a modification (or creation) time instead.

    Args:
        info: One entry of ``fs.find(..., detail=True)`` / ``fs.info(path)``.

    Returns:
        ``"<size>:<tag>"``, e.g. ``"20931:etag=\"9b2cf5...\""`` or ``"20931:mtime=1732350000.123456"``.
    """
    size = info.get("size")
    for key in VERSION_KEYS:
        if info.get(key) not in (None, ""):
            return f"{size}:{key.lower()}={info[key]}"
    for key in TIME_KEYS:
        if info.get(key) not in (None, ""):
            return f"{size}:mtime={info[key]}"
    return f"{size}:"


def folder_listing(directory: str, recursive: bool = True) -> dict[str, tuple[str, str]]:
    """Every file under ``directory`` from ONE ``fs.find(detail=True)`` call (no per-file request).

    Args:
        directory: Local path or fsspec URL of a folder.
        recursive: Descend into sub-folders.

    Returns:
        Relative path (``/``-separated) -> ``(openable source, file_version)``, sorted by relative path.
        Empty when the folder does not exist.
    """
    fs, base = fsspec.core.url_to_fs(directory)
    if not fs.isdir(base):
        return {}
    base = base.rstrip("/")
    found: dict[str, tuple[str, str]] = {}
    for path, info in fs.find(base, maxdepth=None if recursive else 1, detail=True).items():
        if info.get("islink"):  # local symlink: the target's size and mtime (the link's own never change)
            try:
                target = os.stat(path)
            except OSError:  # dangling
                continue
            info = {"size": target.st_size, "mtime": target.st_mtime, "type": "file"}
        if info.get("type", "file") != "file":
            continue
        relative = path[len(base) + 1:] if path.startswith(base + "/") else posixpath.basename(path)
        found[relative] = (_to_source(fs, path), file_version(info))
    return dict(sorted(found.items()))


def list_files_versioned(directory: str, suffixes: tuple[str, ...],
                         recursive: bool = True) -> dict[str, tuple[str, str]]:
    """:func:`folder_listing` restricted to names ending with one of ``suffixes`` (case-insensitive)."""
    lowered = tuple(suffix.lower() for suffix in suffixes)
    return {rel: entry for rel, entry in folder_listing(directory, recursive).items() if rel.lower().endswith(lowered)}


def list_files(directory: str, suffixes: tuple[str, ...], recursive: bool = True) -> dict[str, str]:
    """Files under ``directory`` whose names end with one of ``suffixes`` (case-insensitive).

    Args:
        directory: Local path or fsspec URL of a folder.
        suffixes: Accepted name endings, e.g. ``(".png", ".jpg")`` or ``("_leftImg8bit.png",)``.
        recursive: Descend into sub-folders.

    Returns:
        Relative path (``/``-separated, relative to ``directory``) -> openable source string, sorted by
        relative path. Empty when the folder does not exist.
    """
    return {rel: source for rel, (source, _) in list_files_versioned(directory, suffixes, recursive).items()}


def read_text(source: str) -> str:
    """Read a small text file (list files, JSON) through fsspec as UTF-8."""
    with fsspec.open(source, "rt", encoding="utf-8") as handle:
        return handle.read()


def exists(source: str) -> bool:
    """True when ``source`` (path or URL) exists."""
    fs, path = fsspec.core.url_to_fs(source)
    return fs.exists(path)
