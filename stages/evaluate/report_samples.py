"""Collect the report samples of an eval stage output: image and GT from the adapter, predictions from the shards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.report import Sample
from pipeline.sample_files import decode_label_png
from pipeline.tar_samples import iter_tar_samples


def read_predictions(shard_urls: Sequence[str], keys: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Key -> {method: [H, W] prediction ids} for the wanted keys, from the eval shards' `<method>.png` files."""
    wanted, found = set(keys), {}
    for url in shard_urls:
        for sample in iter_tar_samples(url):
            if sample["__key__"] in wanted:
                found[sample["__key__"]] = {ext[: -len(".png")]: decode_label_png(data).astype(np.int64)
                                            for ext, data in sample.items() if ext.endswith(".png")}
        if wanted <= set(found):
            break
    return found


def gather_samples(adapter: Any, map_gt: Callable[[np.ndarray], np.ndarray], shard_urls: Sequence[str],
                   keys: Sequence[str]) -> list[Sample]:
    """(key, image [H, W, 3] uint8, eval GT [H, W] int64, {method: prediction}) for each key, in order.

    Args:
        adapter: the eval data adapter (`list_items`, `load`); images and GT are reloaded through it.
        map_gt: the stage's GT mapping (identity or the `unseen_only` remap).
        shard_urls: eval shards holding the keys.
        keys: sample keys to show; a key that no longer loads is skipped.
    """
    wanted = set(keys)
    refs = {ref.key: ref for ref in adapter.list_items() if ref.key in wanted}
    predictions = read_predictions(shard_urls, keys)
    samples: list[Sample] = []
    for key in keys:
        record = adapter.load(refs[key]) if key in refs else None
        if record is None or not record.ok or record.label is None or key not in predictions:
            continue
        samples.append((key, record.image, map_gt(record.label), predictions[key]))
    return samples
