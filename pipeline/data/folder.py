"""Unlabeled images anywhere under a folder (local path or fsspec URL)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.data.images import DEFAULT_MAX_PIXELS
from pipeline.data.listing import list_files_versioned
from pipeline.data.records import (
    ImageRecord,
    InputIdentity,
    ItemRef,
    check_unique_keys,
    hashed_key,
    load_image_record,
    refs_identity,
    resolve_vocab,
)

if TYPE_CHECKING:
    from pipeline.data.vocab import Vocabulary

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
"""PIL-readable extensions picked up by default (case-insensitive)."""


@dataclass
class FolderAdapter:
    """Every image file below ``root`` (recursively); no labels.

    Keys are ``"{name}_{relative path without extension}_{8 hex digits}"`` with characters outside
    ``[A-Za-z0-9_-]`` replaced by ``_``; the digits are a SHA-1 of the relative path, so two files that
    sanitise alike (``a.b.jpg`` and ``a_b.jpg``) still get distinct keys.

    Attributes:
        root: Folder, local path or fsspec URL.
        vocab: Vocabulary name/path or object (required: the classes to pseudo-label with).
        name: Dataset name used in keys and ``meta["dataset"]``.
        extensions: Accepted file endings (case-insensitive).
        recursive: Search sub-folders.
        max_pixels: Largest accepted image size (pixels).
    """

    root: str
    vocab: str | Vocabulary | None = None
    name: str = "folder"
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    recursive: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        self.vocab = resolve_vocab(self.vocab, None, "folder")
        self.extensions = tuple(self.extensions)

    def list_items(self) -> list[ItemRef]:
        """Image files sorted by key, each with its listing version (one ``find`` of ``root``).

        Raises:
            FileNotFoundError: When no image file is found under ``root``.
        """
        files = list_files_versioned(self.root, self.extensions, recursive=self.recursive)
        if not files:
            raise FileNotFoundError(f"folder: no files ending in {self.extensions} under {self.root}")
        refs = sorted((ItemRef(hashed_key(self.name, rel), source, version=version)
                       for rel, (source, version) in files.items()), key=lambda ref: ref.key)
        check_unique_keys(refs)
        return refs

    def input_identity(self) -> InputIdentity:
        """One identity per image: path, size and mtime/ETag from the listing."""
        return refs_identity(self.list_items())

    def load(self, ref: ItemRef) -> ImageRecord:
        """Decode one image (``label`` stays None); never raises on bad data."""
        return load_image_record(ref, self.name, None, self.max_pixels)
