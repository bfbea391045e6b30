"""The adapter contract: item references, loaded records, and the shared load-and-fail-softly path.

Adapters list :class:`ItemRef` objects on the driver (cheap, picklable) and turn each into an
:class:`ImageRecord` on a worker. Bad data never raises: the record carries ``error`` instead.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, read_bytes
from pipeline.fingerprint import digest

if TYPE_CHECKING:
    from pipeline.data.vocab import Vocabulary

_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]+")

LabelDecoder = Callable[[bytes], tuple[np.ndarray, list[str]]]
"""Turns label-file bytes into ``(HxW train ids, notes)``; raises ImageDecodeError/ValueError on bad data."""


@dataclass(frozen=True)
class ItemRef:
    """One input sample, listed on the driver and loaded on a worker.

    Attributes:
        key: Unique, deterministic sample key; only ``[A-Za-z0-9_-]`` (WebDataset keys cannot hold dots).
        source: Path or fsspec URL of the image (for the ``shards`` adapter: ``"<tar url>#<member>"``).
        label_source: Path or URL of the label file, or None when there is none.
        extra: Adapter-specific, picklable values (e.g. the COCO image id, tar member offsets).
        version: The item's listing identity: :func:`pipeline.data.listing.file_version` of its files (size and
            ETag or mtime; the image's, then the label's) and, for annotation-file datasets, a digest of the
            item's own annotations. Enters the node's fingerprint; never computed from image bytes.
    """

    key: str
    source: str
    label_source: str | None = None
    extra: tuple = ()
    version: str = ""


@dataclass(frozen=True)
class InputIdentity:
    """What an input adapter contributes to its node's fingerprint (design contract 2), from listings only.

    Attributes:
        items: Item name -> identity (:func:`ref_identity`'s 16 hex digits, or a tar's checksum / listing version),
            sorted by name. Names are sample keys, except for the ``shards`` adapter, whose items are its tar files
            (their samples are only known by reading them).
        extra: Digest of what every item depends on (e.g. a COCO JSON's category list); "" when nothing.
    """

    items: dict[str, str]
    extra: str = ""

    @cached_property
    def digest(self) -> str:
        """16 hex digits over ``extra`` and every (name, identity) pair."""
        return digest({"extra": self.extra, "items": sorted(self.items.items())})


def ref_identity(ref: ItemRef) -> str:
    """An item's identity: its sources, listing version and adapter extras (not its key, which names it)."""
    return digest([ref.source, ref.label_source, ref.version, list(ref.extra)])


def refs_identity(refs: Sequence[ItemRef], extra: str = "") -> InputIdentity:
    """The :class:`InputIdentity` of adapters whose items are their refs."""
    return InputIdentity({ref.key: ref_identity(ref) for ref in sorted(refs, key=lambda r: r.key)}, extra)


@dataclass
class ImageRecord:
    """A loaded sample, or the reason it could not be loaded.

    Attributes:
        key: Same as the :class:`ItemRef` key.
        image: ``HxWx3 uint8`` RGB with EXIF orientation applied; None when failed.
        label: ``HxW`` train ids (``vocab.label_dtype``), ignore = ``vocab.ignore_index``; None when the
            dataset has no ground truth or loading failed.
        meta: JSON-safe: ``source``, ``label_source``, ``dataset``, ``orig_size`` ``[H, W]`` (pixels),
            ``notes`` (list of conversion notes), plus adapter-specific entries.
        error: Why loading failed (e.g. ``"zero-byte file"``); None on success.
    """

    key: str
    image: np.ndarray | None
    label: np.ndarray | None
    meta: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the record loaded without error."""
        return self.error is None


class Adapter(Protocol):
    """What every input adapter provides (see ``pipeline/data/registry.py`` for the kinds)."""

    vocab: Vocabulary
    name: str

    def list_items(self) -> list[ItemRef]:
        """All items in deterministic (sorted) order, without decoding anything."""
        ...

    def load(self, ref: ItemRef) -> ImageRecord:
        """Load one item; bad data gives a record with ``error`` set instead of raising."""
        ...

    def input_identity(self) -> InputIdentity:
        """Listing identity of every item (one listing per folder, small annotation files; no image bytes)."""
        ...


def sanitize_key(text: str) -> str:
    """Replace every run of characters outside ``[A-Za-z0-9_-]`` by ``_`` (e.g. ``"a/b.c"`` -> ``"a_b_c"``)."""
    return _KEY_BAD_CHARS.sub("_", text).strip("_") or "_"


def hashed_key(prefix: str, relative_path: str) -> str:
    """Key from a relative path plus an 8-hex-digit SHA-1 suffix of the path, unique even after sanitising."""
    path_hash = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:8]
    stem = relative_path.rsplit(".", 1)[0] if "." in relative_path.rsplit("/", 1)[-1] else relative_path
    return sanitize_key(f"{prefix}_{stem}") + f"_{path_hash}"


def check_unique_keys(refs: Sequence[ItemRef]) -> None:
    """Raise ValueError naming duplicated keys (two inputs whose names sanitise to the same key)."""
    counts = Counter(ref.key for ref in refs)
    duplicates = sorted(key for key, count in counts.items() if count > 1)
    if duplicates:
        raise ValueError(f"duplicate item keys after sanitising names: {duplicates[:5]} ({len(duplicates)} in all)")


def failed_record(key: str, meta: dict[str, Any], reason: str) -> ImageRecord:
    """A record for an item that could not be loaded."""
    return ImageRecord(key=key, image=None, label=None, meta=meta, error=reason)


def _io_reason(exc: OSError, source: str) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {source}"
    return f"cannot read {source}: {type(exc).__name__}: {exc}"


def load_image_record(
    ref: ItemRef,
    dataset: str,
    label_decoder: LabelDecoder | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    read: Callable[[str], bytes] = read_bytes,
) -> ImageRecord:
    """Read and decode ``ref.source`` (and ``ref.label_source`` through ``label_decoder``).

    Args:
        ref: The item.
        dataset: Adapter name, stored in ``meta["dataset"]``.
        label_decoder: Maps label bytes to ``(HxW train ids, notes)``; None means the dataset has no
            labels (the record's ``label`` stays None). When given but ``ref.label_source`` is None,
            the record fails with "label file missing".
        max_pixels: Largest accepted image size (pixels).
        read: Byte reader for a source string (default: whole-file fsspec read).

    Returns:
        The record; ``error`` set on any data problem (missing/empty/corrupt file, size mismatch).
        Labels are never EXIF-rotated (label PNGs carry none; datasets annotate the displayed image), so an
        image whose EXIF rotation makes it disagree with its label fails with a size message.
    """
    meta: dict[str, Any] = {"source": ref.source, "label_source": ref.label_source, "dataset": dataset, "notes": []}
    try:
        image, notes = decode_image(read(ref.source), max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return failed_record(ref.key, meta, exc.reason)
    except OSError as exc:
        return failed_record(ref.key, meta, _io_reason(exc, ref.source))
    meta["orig_size"] = [int(image.shape[0]), int(image.shape[1])]
    meta["notes"] = notes
    if label_decoder is None:
        return ImageRecord(key=ref.key, image=image, label=None, meta=meta)
    if ref.label_source is None:
        return failed_record(ref.key, meta, "label file missing")
    try:
        label, label_notes = label_decoder(read(ref.label_source))
    except ImageDecodeError as exc:
        return failed_record(ref.key, meta, f"label: {exc.reason}")
    except ValueError as exc:
        return failed_record(ref.key, meta, f"label: {exc}")
    except OSError as exc:
        return failed_record(ref.key, meta, "label: " + _io_reason(exc, ref.label_source))
    meta["notes"] = notes + [f"label: {note}" for note in label_notes]
    if label.shape != image.shape[:2]:
        return failed_record(ref.key, meta, f"label size {label.shape[0]}x{label.shape[1]} != image size "
                             f"{image.shape[0]}x{image.shape[1]} (HxW)")
    return ImageRecord(key=ref.key, image=image, label=label, meta=meta)


def resolve_vocab(vocab: str | Vocabulary | None, default: str | None, kind: str) -> Vocabulary:
    """Turn a vocabulary name/path (or an already-built one) into a :class:`Vocabulary`.

    Args:
        vocab: Name (``"camvid_11"``), YAML path, a Vocabulary, or None for the kind's default.
        default: The kind's default vocabulary name; None when the kind has none.
        kind: Adapter kind, for the error message.

    Raises:
        ValueError: When no vocabulary is given and the kind has no default.
    """
    from pipeline.data.vocab import Vocabulary, load_vocab

    if isinstance(vocab, Vocabulary):
        return vocab
    chosen = vocab if vocab is not None else default
    if chosen is None:
        raise ValueError(f"adapter kind '{kind}' needs a vocabulary: set `vocab` (e.g. vocab=coco_stuff_171)")
    return load_vocab(chosen)
