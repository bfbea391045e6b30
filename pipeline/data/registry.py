"""The input-adapter kinds, in one explicit dict, and the config -> adapter builder."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.data.coco import COCOAdapter
from pipeline.data.folder import FolderAdapter
from pipeline.data.records import Adapter
from pipeline.data.semseg import (
    ADE20KAdapter,
    CamVidAdapter,
    CityscapesAdapter,
    COCOStuffAdapter,
    TrainIdAdapter,
    VOCAdapter,
)
from pipeline.data.toyworld import ToyWorldAdapter
from pipeline.data.wds import ShardsAdapter

ADAPTERS: dict[str, type] = {
    "folder": FolderAdapter,
    "coco": COCOAdapter,
    "coco_stuff": COCOStuffAdapter,
    "voc": VOCAdapter,
    "ade20k": ADE20KAdapter,
    "cityscapes": CityscapesAdapter,
    "camvid": CamVidAdapter,
    "semseg": TrainIdAdapter,
    "shards": ShardsAdapter,
    "toyworld": ToyWorldAdapter,
}


def adapter_fields(kind: str) -> dict[str, Any]:
    """The config keys a kind accepts, with their defaults (``dataclasses.MISSING`` when required)."""
    cls = ADAPTERS[kind]
    return {f.name: (f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls) if f.init}


def build_adapter(cfg: Mapping[str, Any]) -> Adapter:
    """Build an adapter from a config mapping such as ``{"kind": "camvid", "root": "...", "split": "val"}``.

    ``None`` values are dropped so the kind's defaults apply; sequences (lists, OmegaConf ListConfig) become tuples.

    Args:
        cfg: ``kind`` plus the kind's fields (see :func:`adapter_fields`).

    Returns:
        The adapter (its vocabulary already loaded and checked against the label convention).

    Raises:
        ValueError: Unknown kind (lists the kinds), unknown or missing keys (names them and the valid ones),
            or a vocabulary that does not match the dataset's labels.
    """
    options = {key: value for key, value in dict(cfg).items() if value is not None}
    kind = options.pop("kind", None)
    if kind not in ADAPTERS:
        raise ValueError(f"unknown input adapter kind {kind!r}; known kinds: {sorted(ADAPTERS)}")
    fields = adapter_fields(kind)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"input adapter '{kind}' has no option(s) {unknown}; valid options: {sorted(fields)}")
    missing = sorted(name for name, default in fields.items() if default is dataclasses.MISSING and name not in options)
    if missing:
        raise ValueError(f"input adapter '{kind}' needs option(s) {missing}")
    options = {key: tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
               for key, value in options.items()}
    return ADAPTERS[kind](**options)
