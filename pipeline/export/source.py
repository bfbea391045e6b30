"""What an export reads: the source stage output's description and its samples, with keys made safe for file names.

A source is a `pseudolabel/1` output (label map `label.png`, instance masks `masks.json`, optional image and
`gt.png`) or an `eval/1` output, whose label map is one method's prediction `<method>.png` (no image, no masks).
Sample keys are sanitised (`pipeline.data.records.sanitize_key`: anything outside ``[A-Za-z0-9_-]`` becomes
``_``) and must then be valid WebDataset keys; two members that sanitise onto one key refuse the whole shard
(`UnsafeShardError`) before anything of it is written.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.config import ConfigError
from pipeline.data.records import sanitize_key
from pipeline.data.vocab import Vocabulary
from pipeline.sample_files import IMAGE_EXTENSIONS
from pipeline.shards import StageOutput, validate_key
from pipeline.tar_samples import UnsafeShardError, iter_tar_samples

SCHEMAS = ("pseudolabel/1", "eval/1")


@dataclass(frozen=True)
class SourceInfo:
    """The parts of a source manifest an export needs (small, picklable).

    Attributes:
        node, fingerprint, schema: of the source stage output.
        label_member: member holding the label map: "label.png", or "<method>.png" for eval outputs.
        vocab: the source's vocabulary (train ids of its label maps).
        shards: (tar URL, recorded sha256) per source shard, in order.
    """

    node: str
    fingerprint: str
    schema: str
    label_member: str
    vocab: Vocabulary
    shards: tuple[tuple[str, str], ...]


def describe_source(output: StageOutput, method: str | None, key: str) -> SourceInfo:
    """Check that `output` can be exported (schema, vocabulary, eval method) and describe it.

    Args:
        output: the opened source.
        method: for eval sources, the method whose predictions are exported (may be None with one method).
        key: config key prefix for messages, e.g. "export".

    Raises:
        ConfigError: naming the key and the fix.
    """
    manifest = output.manifest
    schema = manifest.get("schema")
    if schema not in SCHEMAS:
        raise ConfigError(f"{key}: {output.path} holds {schema!r} samples; export reads {list(SCHEMAS)} outputs "
                          "(pseudolabel, selftrain, eval)")
    if "vocab" not in manifest:
        raise ConfigError(f"{key}: {output.path}/manifest.json has no vocabulary; re-run that stage")
    vocab = Vocabulary.from_dict(manifest["vocab"])
    label_member = "label.png"
    if schema == "eval/1":
        methods = [m["name"] for m in manifest.get("config", {}).get("methods", [])]
        if method is None and len(methods) == 1:
            method = methods[0]
        if method not in methods:
            raise ConfigError(f"{key}.method={method!r}: choose the eval method to export, one of {methods}")
        label_member = f"{method}.png"
    elif method is not None:
        raise ConfigError(f"{key}.method={method!r}: only eval outputs have methods; drop it for {schema}")
    shards = tuple((url, s["sha256"]) for url, s in zip(output.shard_urls(), manifest["shards"], strict=True))
    return SourceInfo(manifest.get("node", ""), output.fingerprint, schema, label_member, vocab, shards)


@dataclass
class ExportSample:
    """One source sample, its key validated.

    Attributes:
        key: the safe key: file stem of everything written for the sample.
        member_key: the key as stored in the shard (differs when sanitising changed it).
        shard: the source tar URL.
        label: the label PNG as stored ([H, W] uint8 / uint16 train ids), None when the member is missing.
        image: image bytes as stored, None when the sample has none (eval outputs, image_format=none).
        image_ext: "jpg" or "png" for `image`.
        masks: parsed masks.json entries ([] when absent).
        gt: ground-truth PNG bytes, None when absent.
        provenance: the parsed `json` member ({} when absent).
    """

    key: str
    member_key: str
    shard: str
    label: bytes | None
    image: bytes | None = None
    image_ext: str | None = None
    masks: list[dict[str, Any]] = field(default_factory=list)
    gt: bytes | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """`<tar url>#<stored key>`: the sidecar's source column."""
        return f"{self.shard}#{self.member_key}"


def safe_key(member_key: str, url: str) -> str:
    """The file-name-safe key of a stored key; `UnsafeShardError` when none can be made."""
    key = sanitize_key(member_key)
    try:
        validate_key(key)
    except ValueError as error:
        raise UnsafeShardError(f"{url}: sample key {member_key!r}: {error}") from None
    return key


def iter_export_samples(url: str, info: SourceInfo, max_member_bytes: int,
                        sha256: str | None = None) -> Iterator[ExportSample]:
    """The samples of one source shard, in tar order (members checked by `pipeline.tar_samples`).

    Raises:
        UnsafeShardError: an unsafe member, a failed checksum, or two stored keys that sanitise to one key.
    """
    seen: dict[str, str] = {}
    for raw in iter_tar_samples(url, max_member_bytes, sha256):
        member_key = raw["__key__"]
        key = safe_key(member_key, url)
        if key in seen:
            raise UnsafeShardError(f"{url}: sample keys {seen[key]!r} and {member_key!r} both become {key!r} as file "
                                   "names; refused")
        seen[key] = member_key
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        yield ExportSample(
            key=key, member_key=member_key, shard=url, label=raw.get(info.label_member),
            image=raw.get(image_ext) if image_ext else None, image_ext="jpg" if image_ext == "jpeg" else image_ext,
            masks=json.loads(raw["masks.json"]) if "masks.json" in raw else [], gt=raw.get("gt.png"),
            provenance=json.loads(raw["json"]) if "json" in raw else {})


def source_image(sample: ExportSample) -> tuple[bytes, str] | None:
    """(bytes, "jpg" | "png") of the sample's image: the stored member, else the file `json.source` names when it
    is a readable JPEG/PNG path or URL; None when neither exists (e.g. toy-world or shard-member sources)."""
    if sample.image is not None:
        return sample.image, sample.image_ext or "jpg"
    source = str(sample.provenance.get("source", ""))
    ext = posixpath.splitext(source.split("?", 1)[0])[1].lower().lstrip(".")
    if ext not in ("jpg", "jpeg", "png") or "#" in source:
        return None
    try:
        with fsspec.open(source, "rb") as handle:
            return handle.read(), "png" if ext == "png" else "jpg"
    except (OSError, ValueError, ImportError):
        return None
