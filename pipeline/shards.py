"""WebDataset shards on any fsspec filesystem: the one place that writes, commits and reads them.

Layout of one stage output (design contract 3)::

    <output_root>/<node>/current.json            pointer: {"fingerprint": ..., "path": ...}
    <output_root>/<node>/<fingerprint>/
        000000.tar          plain uncompressed tar; members "<key>.<ext>", one sample's files contiguous,
                            extensions sorted, fixed mtime/uid/gid/mode, so equal samples give equal bytes
        000000.parquet      sidecar, one row per input sample: key, source, status, error, seconds
        000000.done.json    done-marker, written last: count, failed, sha256, bytes, fingerprint
        inputs.parquet      the input items' identities (name, identity) for `dry_run` explanations
        manifest.json       shards (with their input items' digest), counts, checksums, fingerprint and its base,
                            resolved config, versions, vocabulary
        _lease.json         only while a run writes here: owner, host, pid, heartbeat (`pipeline.lease`)
        sizes.json          {"000000.tar": n, ...}                      (open_clip's format)
        _info.json          {"name", "splits": {"train": {...}}}        (timm's format)

A shard counts as complete only when its done-marker exists, names the stage's fingerprint and the tar's
size matches the marker; nothing else is trusted, so a crash at any point leaves no shard that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sample_files import decode_sample
from pipeline.tar_samples import UnsafeShardError, iter_tar_samples

TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed so tar bytes never depend on the clock
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
EXT_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,50}$")
POINTER_NAME = "current.json"
MANIFEST_NAME = "manifest.json"
SIDECAR_SCHEMA = pa.schema(
    [("key", pa.string()), ("source", pa.string()), ("status", pa.string()), ("error", pa.string()),
     ("seconds", pa.float64())]
)


def shard_name(index: int) -> str:
    """The base name of shard `index` ("000042"); the only place shard names are built."""
    return f"{index:06d}"


@dataclass
class SampleOutput:
    """What a stage produces for one input sample.

    Attributes:
        key: WebDataset key, `[A-Za-z0-9_-]` only (no dots), unique within the stage output.
        files: extension -> bytes, e.g. {"grid.npy": ..., "json": ...}; None when the sample failed.
        source: where the sample came from (path, URL, seed stream), for the sidecar.
        error: the reason when the sample failed; None when it succeeded.
        seconds: time spent on this sample (sidecar only, never in the tar).
        stats: the sample's contribution to per-shard aggregates, handed to `Stage.fold` by the executor once
            the sample's batch succeeded (in memory only: never written, never pickled into a marker).
    """

    key: str
    files: dict[str, bytes] | None
    source: str = ""
    error: str | None = None
    seconds: float = 0.0
    stats: Any = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None and self.files is not None


@dataclass
class ShardDone:
    """Contents of a shard's done-marker."""

    shard: str
    count: int
    failed: int
    sha256: str
    bytes: int
    fingerprint: str
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def validate_key(key: str) -> None:
    """Raise ValueError with the fix when `key` is not a valid WebDataset key."""
    if not KEY_PATTERN.match(key):
        raise ValueError(
            f"invalid sample key {key!r}: keys must match {KEY_PATTERN.pattern} (no dots, no slashes); "
            "replace other characters with '_'"
        )


def tar_bytes(samples: Iterable[SampleOutput]) -> bytes:
    """Serialise successful samples to deterministic tar bytes (USTAR, sorted extensions, fixed metadata)."""
    buffer = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if not sample.ok:
                continue
            validate_key(sample.key)
            if sample.key in seen:
                raise ValueError(f"duplicate sample key {sample.key!r} in one shard")
            seen.add(sample.key)
            for ext in sorted(sample.files):
                if not EXT_PATTERN.match(ext) or ext.startswith("."):
                    raise ValueError(f"invalid file extension {ext!r} for sample {sample.key!r}")
                data = sample.files[ext]
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sidecar_bytes(samples: Iterable[SampleOutput]) -> bytes:
    """One parquet row per input sample (ok and failed alike)."""
    rows = [
        {"key": s.key, "source": s.source, "status": "ok" if s.ok else "failed", "error": s.error,
         "seconds": float(s.seconds)}
        for s in samples
    ]
    table = pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def join(base: str, *parts: str) -> str:
    """Join URL or path components with '/' (fsspec style)."""
    return "/".join([base.rstrip("/"), *parts])


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that readers see the old state or the whole new file, never a partial one.

    Local filesystems: write a temporary file beside the target, fsync, then rename. Object stores
    (and fsspec's memory filesystem): a single `pipe` call publishes the object whole.
    """
    if _is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, data)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def commit_shard(
    fs: fsspec.AbstractFileSystem, stage_dir: str, index: int, samples: list[SampleOutput], fingerprint: str,
    seconds: float = 0.0, extra: dict[str, Any] | None = None,
) -> ShardDone:
    """Write tar, sidecar and, last, the done-marker of shard `index` under `stage_dir`."""
    name = shard_name(index)
    data = tar_bytes(samples)
    write_atomic(fs, join(stage_dir, f"{name}.tar"), data)
    write_atomic(fs, join(stage_dir, f"{name}.parquet"), sidecar_bytes(samples))
    done = ShardDone(
        shard=name, count=sum(s.ok for s in samples), failed=sum(not s.ok for s in samples),
        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), fingerprint=fingerprint, seconds=seconds,
        extra=extra or {},
    )
    _write_done(fs, stage_dir, done)
    return done


def _write_done(fs: fsspec.AbstractFileSystem, stage_dir: str, done: ShardDone) -> None:
    write_atomic(fs, join(stage_dir, f"{done.shard}.done.json"), json.dumps(asdict(done), indent=1).encode())


def reuse_shard(fs: fsspec.AbstractFileSystem, source_dir: str, source: ShardDone, stage_dir: str, index: int,
                fingerprint: str) -> ShardDone:
    """Publish a committed shard of another output of the same node as shard `index` of `stage_dir`.

    The tar and sidecar are hard-linked on local disks (every write here replaces files by rename, so a link never
    sees a later change) and copied elsewhere (server-side on object stores); the done-marker, with the new name
    and fingerprint and the source's counts, checksum and `extra` aggregates, is written last as always.
    """
    name = shard_name(index)
    for suffix in (".tar", ".parquet"):
        _link_or_copy(fs, join(source_dir, f"{source.shard}{suffix}"), join(stage_dir, f"{name}{suffix}"))
    done = ShardDone(**{**asdict(source), "shard": name, "fingerprint": fingerprint})
    _write_done(fs, stage_dir, done)
    return done


def _link_or_copy(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    if _is_local(fs):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}"
        try:
            os.link(source, tmp)
        except OSError:  # another device, or a filesystem without hard links
            with open(source, "rb") as handle:
                write_atomic(fs, target, handle.read())
            return
        os.replace(tmp, target)
    else:
        fs.copy(source, target)


def read_done(fs: fsspec.AbstractFileSystem, stage_dir: str, index: int, fingerprint: str) -> ShardDone | None:
    """The shard's done-marker when it is valid for `fingerprint` and its tar is intact in size, else None."""
    name = shard_name(index)
    try:
        data = fs.cat_file(join(stage_dir, f"{name}.done.json"))
        tar_size = fs.size(join(stage_dir, f"{name}.tar"))
    except FileNotFoundError:
        return None
    return _valid_done(data, fingerprint, tar_size)


def read_dones(fs: fsspec.AbstractFileSystem, stage_dir: str, indices: Iterable[int],
               fingerprint: str) -> dict[int, ShardDone]:
    """The shards of `indices` whose done-marker is valid (as `read_done` judges one), read as one batch.

    One listing of `stage_dir` (names and sizes: which markers exist, the tars' sizes), then one `fs.cat` of the
    markers found, which object stores fetch concurrently: a resume costs 1 LIST page per 1,000 files and one
    GET per committed shard instead of a GET and a HEAD per planned shard, one after another.
    """
    fs.invalidate_cache(stage_dir)  # another process may have committed shards since this one last listed
    try:
        listing = fs.find(stage_dir, maxdepth=1, detail=True)
    except FileNotFoundError:
        return {}
    sizes = {path.rstrip("/").rsplit("/", 1)[-1]: info.get("size") for path, info in listing.items()}
    names = {shard_name(index): index for index in indices}
    markers = [join(stage_dir, f"{name}.done.json") for name in names
               if f"{name}.done.json" in sizes and f"{name}.tar" in sizes]
    found: dict[int, ShardDone] = {}
    for path, data in (fs.cat(markers, on_error="omit") if markers else {}).items():
        name = path.rsplit("/", 1)[-1].removesuffix(".done.json")
        if name in names and (done := _valid_done(data, fingerprint, sizes[f"{name}.tar"])) is not None:
            found[names[name]] = done
    return found


def _valid_done(data: bytes, fingerprint: str, tar_size: int | None) -> ShardDone | None:
    """The done-marker in `data` when it parses, names `fingerprint` and its tar has the recorded size."""
    try:
        done = ShardDone(**json.loads(data))
    except (json.JSONDecodeError, TypeError, ValueError):
        return None
    return done if done.fingerprint == fingerprint and tar_size == done.bytes else None


def write_stage_index(
    fs: fsspec.AbstractFileSystem, stage_dir: str, manifest: dict[str, Any], done: list[ShardDone]
) -> None:
    """Write manifest.json, sizes.json and _info.json for a finished stage (manifest last)."""
    filenames = [f"{d.shard}.tar" for d in done]
    counts = [d.count for d in done]
    write_atomic(fs, join(stage_dir, "sizes.json"), json.dumps(dict(zip(filenames, counts)), indent=1).encode())
    info = {
        "name": manifest.get("node", "segetl"),
        "splits": {"train": {"name": "train", "num_samples": sum(counts), "filenames": filenames,
                             "shard_lengths": counts}},
    }
    write_atomic(fs, join(stage_dir, "_info.json"), json.dumps(info, indent=1).encode())
    write_atomic(fs, join(stage_dir, MANIFEST_NAME), json.dumps(manifest, indent=1, sort_keys=True).encode())


def read_pointer(fs: fsspec.AbstractFileSystem, node_dir: str) -> str | None:
    """The fingerprint `<node_dir>/current.json` names, or None when there is no pointer yet."""
    try:
        return json.loads(fs.cat_file(join(node_dir, POINTER_NAME)))["fingerprint"]
    except FileNotFoundError:
        return None


def write_pointer(fs: fsspec.AbstractFileSystem, node_dir: str, fingerprint: str) -> None:
    """Point `<node_dir>/current.json` at the fingerprint directory that just completed (or was found up to date)."""
    pointer = {"fingerprint": fingerprint, "path": fingerprint, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime())}
    write_atomic(fs, join(node_dir, POINTER_NAME), json.dumps(pointer, indent=1).encode())


class StageOutput:
    """A finished stage output, opened from its node directory (follows the pointer) or a fingerprint directory.

    Args:
        url: `<output_root>/<node>` or `<output_root>/<node>/<fingerprint>`, local path or fsspec URL.
        storage_options: passed to fsspec.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.fs, path = fsspec.core.url_to_fs(url, **storage_options)
        path = path.rstrip("/")
        if not self.fs.exists(join(path, MANIFEST_NAME)):
            fingerprint = read_pointer(self.fs, path)
            if fingerprint is None:
                raise FileNotFoundError(f"{url} is neither a stage output (no {MANIFEST_NAME}) nor a node "
                                        f"directory (no {POINTER_NAME}); run that stage first")
            path = join(path, fingerprint)
        self.path = path
        self.manifest: dict[str, Any] = json.loads(self.fs.cat_file(join(path, MANIFEST_NAME)))

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def shard_urls(self) -> list[str]:
        """The complete shards, in order: plain paths on local disk, full URLs (with protocol) elsewhere."""
        paths = [join(self.path, s["name"]) for s in self.manifest["shards"]]
        return paths if _is_local(self.fs) else [self.fs.unstrip_protocol(p) for p in paths]

    def shard_checksums(self) -> dict[str, str]:
        """Shard URL (as `shard_urls` gives it) -> the sha256 recorded in the manifest."""
        return {url: s["sha256"] for url, s in zip(self.shard_urls(), self.manifest["shards"], strict=True)}

    def samples(self, shard_urls: list[str] | None = None, verify: bool = False) -> Iterator[dict[str, Any]]:
        """Raw samples {"__key__": key, "__url__": url, ext: bytes} read with Python's tarfile.

        Members are checked (`pipeline.tar_samples`: no traversal, links or oversized members); with `verify`
        each shard's sha256 is checked against the manifest before its first sample is yielded.
        """
        checksums = self.shard_checksums() if verify else {}
        for url in shard_urls if shard_urls is not None else self.shard_urls():
            yield from iter_tar_samples(url, sha256=self._expected(checksums, url) if verify else None)

    def _expected(self, checksums: dict[str, str], url: str) -> str:
        if url not in checksums:
            raise UnsafeShardError(f"{url} is not a shard of {self.path}'s manifest; nothing to verify it against")
        return checksums[url]

    def webdataset(self, *stages: Any, split_by_node: bool = True, split_by_worker: bool = True,
                   decode: bool = True, verify: bool = False) -> Any:
        """A `webdataset.DataPipeline` over the shards (any fsspec URL), split per rank and per worker.

        Args:
            stages: further pipeline stages (e.g. `wds.shuffle(100)`, `wds.batched(8)`).
            decode: decode members with `pipeline.sample_files.decode_sample` (label maps as integer arrays of
                their stored dtype, images as RGB uint8); False yields raw bytes.
            verify: check each shard's sha256 against the manifest before reading it.
        """
        import webdataset as wds

        pipeline: list[Any] = [wds.SimpleShardList(self.shard_urls())]
        if split_by_node:
            pipeline.append(wds.split_by_node)
        if split_by_worker:
            pipeline.append(wds.split_by_worker)
        pipeline.append(_TarSamples(self.shard_checksums() if verify else None))
        if decode:
            pipeline.append(wds.map(decode_sample))
        return wds.DataPipeline(*pipeline, *stages)

    def torch_dataset(self, transform: Any = None, decode: bool = True, verify: bool = False) -> Any:
        """A torch IterableDataset with per-rank and per-worker shard splitting.

        Samples are decoded like `webdataset()` (`decode=False`: raw bytes), then passed through `transform`.
        """
        from pipeline.shard_dataset import ShardIterableDataset

        return ShardIterableDataset(self.shard_urls(), transform, decode=decode,
                                    checksums=self.shard_checksums() if verify else None)


class _TarSamples:
    """webdataset pipeline stage: shard specs -> raw samples, optionally verified against recorded checksums."""

    def __init__(self, checksums: dict[str, str] | None) -> None:
        self.checksums = checksums

    def __call__(self, shard_specs: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for spec in shard_specs:
            url = spec["url"]
            yield from iter_tar_samples(url, sha256=None if self.checksums is None else self.checksums[url])


def open_stage(url: str, **storage_options: Any) -> StageOutput:
    """Open a finished stage output; see `StageOutput`."""
    return StageOutput(url, **storage_options)
