"""torch IterableDataset over a stage output's shards (imported lazily: torch is slow to import)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.sample_files import decode_sample
from pipeline.tar_samples import iter_tar_samples, split_for_rank


class ShardIterableDataset(IterableDataset):
    """torch IterableDataset over shard URLs; each (rank, dataloader worker) pair reads a disjoint set of shards.

    Rank and world size come from torch.distributed when initialised, else from RANK / WORLD_SIZE.

    Args:
        shard_urls: the tars, in order.
        transform: applied to each (decoded) sample.
        decode: decode members with `pipeline.sample_files.decode_sample`; False keeps raw bytes.
        checksums: shard URL -> sha256; when given, each shard is verified before it is read.
    """

    def __init__(self, shard_urls: list[str], transform: Any = None, decode: bool = True,
                 checksums: dict[str, str] | None = None) -> None:
        self.shard_urls = list(shard_urls)
        self.transform = transform
        self.decode = decode
        self.checksums = checksums

    def __iter__(self) -> Iterator[Any]:
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in split_for_rank(self.shard_urls, rank, world, worker, workers):
            for sample in iter_tar_samples(url, sha256=None if self.checksums is None else self.checksums[url]):
                sample = decode_sample(sample) if self.decode else sample
                yield self.transform(sample) if self.transform is not None else sample
