"""Existing WebDataset shards (plain tar files, local or fsspec URLs) as an input dataset.

Self-contained on purpose (only ``tarfile`` over fsspec): listing streams each tar once and records
every member's byte offset, so loading one sample is a single ranged read, also on remote stores.
A sample's key is the member path up to the first dot of its file name (the WebDataset rule); its
extension is the rest (``"jpg"``, ``"label.png"``).
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np

from pipeline.data import labels as label_ids
from pipeline.data.images import DEFAULT_MAX_PIXELS, read_label_png
from pipeline.data.listing import folder_listing, join_url, list_files, read_text
from pipeline.data.records import (
    ImageRecord,
    InputIdentity,
    ItemRef,
    check_unique_keys,
    load_image_record,
    resolve_vocab,
    sanitize_key,
)
from pipeline.tar_samples import (
    DEFAULT_MAX_MEMBER_BYTES,
    UnsafeShardError,
    check_member,
    split_member_name,
    verify_shard,
)

if TYPE_CHECKING:
    from pipeline.data.vocab import Vocabulary

MemberSpan = tuple[str, int, int]
"""``(member name, byte offset of its data in the tar, size in bytes)``."""


def tar_members(url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> dict[str, dict[str, MemberSpan]]:
    """Stream one tar and group its regular files by sample key (members checked by
    `pipeline.tar_samples.check_member`; a member repeated in one sample is refused).

    Returns:
        Key -> extension -> :data:`MemberSpan`, in tar order.

    Raises:
        UnsafeShardError: A traversal, absolute, link, special or oversized member, or a repeated member.
    """
    samples: dict[str, dict[str, MemberSpan]] = {}
    with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as archive:
        for member in archive:
            if not check_member(member, url, max_member_bytes):
                continue
            key, extension = split_member_name(member.name)
            extensions = samples.setdefault(key, {})
            if extension.lower() in extensions:
                raise UnsafeShardError(f"{url}: member {member.name!r} appears twice in sample {key!r}; refused")
            extensions[extension.lower()] = (member.name, member.offset_data, member.size)
    return samples


def _by_folder(urls: list[str]) -> dict[str, dict[str, str]]:
    """Folder -> {file name -> the URL as given}."""
    folders: dict[str, dict[str, str]] = {}
    for url in urls:
        folder, name = posixpath.split(url)
        folders.setdefault(folder, {})[name] = url
    return folders


def _manifest_checksums(folder: str) -> dict[str, str]:
    """``{tar name: "sha256:<hex>"}`` from a segetl ``manifest.json`` in ``folder``; {} when there is none."""
    try:
        manifest = json.loads(read_text(join_url(folder, "manifest.json")))
        return {shard["name"]: f"sha256:{shard['sha256']}" for shard in manifest["shards"]}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return {}


def read_span(url: str, offset: int, size: int) -> bytes:
    """Read ``size`` bytes at ``offset`` of ``url`` (a ranged read on remote stores)."""
    with fsspec.open(url, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


@dataclass
class ShardsAdapter:
    """Samples of existing WebDataset tar shards.

    ``ItemRef.source`` is ``"<tar url>#<member name>"`` (an identifier, not directly openable: use
    :meth:`load`); ``extra = (tar url, image span or None, label span or None)``. A sample with no
    image member is listed anyway and loads as a failed record.

    Attributes:
        urls: A tar path/URL, a folder (its ``*.tar`` files), a glob pattern, or a list of tar paths/URLs.
        vocab: Vocabulary name/path or object (required); labels are read as its train ids.
        name: Dataset name for ``meta["dataset"]`` (keys are the shards' own keys, sanitised).
        image_extensions: Member extensions taken as the image, first match wins.
        label_extensions: Member extensions taken as the label map, first match wins.
        with_labels: Load label members; False ignores them.
        max_pixels: Largest accepted image size (pixels).
        verify: Check each tar's sha256 against the one its stage recorded (``manifest.json`` beside it or its
            done-marker) while listing, before any work; a mismatch or a missing record fails the listing.
        max_member_bytes: Largest accepted tar member; larger ones fail the listing (unsafe shard).
    """

    urls: str | list[str] | tuple[str, ...]
    vocab: str | Vocabulary | None = None
    name: str = "shards"
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    label_extensions: tuple[str, ...] = ("label.png", "seg.png")
    with_labels: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    verify: bool = False
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES

    def __post_init__(self) -> None:
        self.vocab = resolve_vocab(self.vocab, None, "shards")
        self.image_extensions = tuple(self.image_extensions)
        self.label_extensions = tuple(self.label_extensions)

    def tar_urls(self) -> list[str]:
        """The shard files, sorted.

        Raises:
            FileNotFoundError: When nothing matches.
        """
        return sorted(self.tar_versions())

    def tar_versions(self) -> dict[str, str]:
        """Tar URL -> version: ``sha256:<hex>`` from a ``manifest.json`` beside the tars (a segetl stage output),
        else the listing version (size and ETag/mtime; one ``find`` per folder, no per-file request).

        Raises:
            FileNotFoundError: When nothing matches.
        """
        if not isinstance(self.urls, str):
            urls = list(self.urls)
        elif any(char in self.urls for char in "*?["):
            fs, _ = fsspec.core.url_to_fs(self.urls)
            urls = [fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path
                    for path in fs.glob(self.urls)]
        elif self.urls.endswith(".tar"):
            urls = [self.urls]
        else:
            urls = list(list_files(self.urls, (".tar",), recursive=False).values())
        if not urls:
            raise FileNotFoundError(f"shards: no tar files at {self.urls}")
        versions: dict[str, str] = {}
        for folder, names in _by_folder(urls).items():
            known = _manifest_checksums(folder) or {rel: v for rel, (_, v) in folder_listing(folder, False).items()}
            versions |= {url: known.get(name, "missing") for name, url in names.items()}
        return dict(sorted(versions.items()))

    def input_identity(self) -> InputIdentity:
        """One item per tar file (its samples are only known by reading it): the tar's checksum or listing version."""
        return InputIdentity(self.tar_versions())

    def _pick(self, extensions: dict[str, MemberSpan], wanted: tuple[str, ...]) -> MemberSpan | None:
        return next((extensions[ext] for ext in wanted if ext in extensions), None)

    def list_items(self) -> list[ItemRef]:
        """All samples of all shards, sorted by key (each tar is streamed once; nothing is decoded); ``version`` is
        the tar's (see :meth:`tar_versions`)."""
        refs = []
        for url, version in self.tar_versions().items():
            if self.verify:
                verify_shard(url)
            for key, extensions in tar_members(url, self.max_member_bytes).items():
                image = self._pick(extensions, self.image_extensions)
                label = self._pick(extensions, self.label_extensions) if self.with_labels else None
                source = f"{url}#{image[0] if image else key + '.<no image member>'}"
                label_source = f"{url}#{label[0]}" if label else None
                refs.append(ItemRef(sanitize_key(key), source, label_source, (url, image, label), version))
        refs.sort(key=lambda ref: ref.key)
        check_unique_keys(refs)
        return refs

    def decode_label(self, data: bytes) -> tuple[np.ndarray, list[str]]:
        """Label member bytes (train ids already) -> ``(HxW train ids, notes)``; out-of-range values -> ignore."""
        raw = read_label_png(data, self.max_pixels)
        ids = label_ids.identity_train_ids(raw, self.vocab.num_classes, self.vocab.ignore_index, self.vocab.label_dtype)
        return ids, []

    def load(self, ref: ItemRef) -> ImageRecord:
        """Read the sample's members by offset and decode them; never raises on bad data."""
        url, image, label = ref.extra
        spans = {f"{url}#{span[0]}": span for span in (image, label) if span is not None}

        def read(source: str) -> bytes:
            if source not in spans:
                raise FileNotFoundError(source)
            _, offset, size = spans[source]
            return read_span(url, offset, size)

        decoder = self.decode_label if self.with_labels and label is not None else None
        record = load_image_record(ref, self.name, decoder, self.max_pixels, read=read)
        if record.error and record.error.startswith("file not found") and image is None:
            record.error = f"no image member ({'/'.join(self.image_extensions)}) for sample in {url}"
        return record
