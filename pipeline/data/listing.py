"""Cheap file listing over fsspec (local folders and remote URLs alike); no file is opened."""

from __future__ import annotations

import os
import posixpath

import fsspec
from fsspec.implementations.local import LocalFileSystem


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
    fs, base = fsspec.core.url_to_fs(directory)
    if not fs.isdir(base):
        return {}
    base = base.rstrip("/")
    paths = fs.find(base) if recursive else fs.ls(base, detail=False)
    lowered = tuple(suffix.lower() for suffix in suffixes)
    found: dict[str, str] = {}
    for path in paths:
        if not path.lower().endswith(lowered) or (not recursive and fs.isdir(path)):
            continue
        relative = path[len(base) + 1:] if path.startswith(base + "/") else posixpath.basename(path)
        found[relative] = _to_source(fs, path)
    return dict(sorted(found.items()))


def read_text(source: str) -> str:
    """Read a small text file (list files, JSON) through fsspec as UTF-8."""
    with fsspec.open(source, "rt", encoding="utf-8") as handle:
        return handle.read()


def exists(source: str) -> bool:
    """True when ``source`` (path or URL) exists."""
    fs, path = fsspec.core.url_to_fs(source)
    return fs.exists(path)
