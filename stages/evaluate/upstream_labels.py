"""Find and read the `label.png` maps of an upstream pseudo-label-like stage output (schema "pseudolabel/1").

The key -> shard index comes from the shards' parquet sidecars (one small row per sample), so locating a sample
never reads the tars; reading then streams only the shards that hold wanted keys and keeps only their label maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import fsspec
import pyarrow.parquet as pq

from pipeline.shards import StageOutput
from pipeline.tar_samples import iter_tar_samples

LABEL_FILE = "label.png"


def sidecar_url(shard_url: str) -> str:
    """The parquet sidecar next to a shard tar (`.../000003.tar` -> `.../000003.parquet`)."""
    return shard_url[: -len(".tar")] + ".parquet" if shard_url.endswith(".tar") else shard_url + ".parquet"


def index_keys(output: StageOutput) -> dict[str, str]:
    """Sample key -> shard URL for every successful sample of `output` (read from the sidecars)."""
    index: dict[str, str] = {}
    for url in output.shard_urls():
        with fsspec.open(sidecar_url(url), "rb") as handle:
            table = pq.read_table(handle, columns=["key", "status"]).to_pylist()
        index.update((row["key"], url) for row in table if row["status"] == "ok")
    return index


def read_label_pngs(wanted: Mapping[str, Iterable[str]]) -> dict[tuple[str, str], bytes]:
    """`label.png` bytes of the wanted samples.

    Args:
        wanted: shard URL -> sample keys to read from it.

    Returns:
        (shard URL, key) -> PNG bytes; keys whose sample has no `label.png` are absent.
    """
    found: dict[tuple[str, str], bytes] = {}
    for url, keys in wanted.items():
        keys = set(keys)
        for sample in iter_tar_samples(url):
            if sample["__key__"] in keys and LABEL_FILE in sample:
                found[(url, sample["__key__"])] = sample[LABEL_FILE]
    return found
