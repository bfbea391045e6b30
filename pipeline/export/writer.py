"""The export folder: paths that cannot leave it, files that appear whole, and a streaming writer for big files.

Every relative path is checked before use: its parts must match ``[A-Za-z0-9_.-]+`` and none may be ``.`` or
``..``, so no key, split or format name can reach outside the folder (the keys were validated earlier too:
`pipeline.export.source`). Small files go through `pipeline.shards.write_atomic`; large ones (COCO JSON, Parquet)
are streamed through `ExportTarget.open`, which publishes the file only when it is complete: a temporary file
beside the target renamed over it on local disk; on other filesystems a local temporary file uploaded in one
`put_file` call (memory stays bounded either way).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import fsspec

from pipeline.shards import _is_local, join, write_atomic

_PART = re.compile(r"^[A-Za-z0-9_.-]+$")


class ExportTarget:
    """An export folder (local path or fsspec URL).

    Args:
        url: the folder; created on first write.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")

    def path(self, relative: str) -> str:
        """The absolute path (fsspec style) of `relative`; ValueError for anything that could leave the folder."""
        parts = relative.split("/")
        if not relative or any(p in ("", ".", "..") or not _PART.match(p) for p in parts):
            raise ValueError(f"export path {relative!r} is not a plain relative path inside {self.url}")
        return join(self.root, *parts)

    def write(self, relative: str, data: bytes) -> None:
        """Write one small file whole (readers see the old file or the new one)."""
        write_atomic(self.fs, self.path(relative), data)

    @contextmanager
    def open(self, relative: str) -> Iterator[IO[bytes]]:
        """A binary handle whose file appears at `relative` only when the block exits without error."""
        path = self.path(relative)
        local = _is_local(self.fs)
        if local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) if local else None)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            if local:
                os.replace(tmp, path)
            else:
                self.fs.put_file(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))
