"""Build each tiny model once per test module: `Clip.build` / `Sam.build` return cached instances per config."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def cached_models() -> Iterator[dict]:
    from pipeline.models.clip import Clip
    from pipeline.models.sam import Sam

    builders = {Clip: Clip.build.__func__, Sam: Sam.build.__func__}
    cache: dict[tuple, object] = {}
    patch = pytest.MonkeyPatch()
    for cls, build in builders.items():
        def cached(klass: type, cfg: object, build: object = build) -> object:
            key = (klass.__name__, repr(cfg))
            if key not in cache:
                cache[key] = build(klass, cfg)
            return cache[key]
        patch.setattr(cls, "build", classmethod(cached))
    yield cache
    patch.undo()
