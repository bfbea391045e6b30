"""Reading WebDataset tars into samples, torch-free: the reader under `pipeline.shards.StageOutput`, the torch
dataset (`pipeline.shard_dataset`) and the trainers' batch streams."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Group a tar's members into samples by key (text before the first dot of the base name)."""
    with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = tar.extractfile(member).read()
        if current is not None:
            yield current


def split_for_rank(items: list[Any], rank: int, world_size: int, worker: int, num_workers: int) -> list[Any]:
    """The slice of `items` that (rank, worker) reads: round-robin over rank*num_workers + worker."""
    slot, slots = rank * num_workers + worker, world_size * num_workers
    return items[slot::slots]
