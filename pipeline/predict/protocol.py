"""Test-time protocols as data, and the one loader of their presets (`conf/protocol/<name>.yaml`).

A protocol (IFSeg, ZegCLIP, ZSSeg, TCL/FMbSeg) fixes how an image is scored: resize rule, whole-image or
sliding-window inference, score transform and seen-class penalty (`pipeline.predict.engine` applies it). A stage
names a preset and overrides some of its fields; `load_protocol` applies the overrides in order and validates
every key and value on the driver (torch-free), a ConfigError naming the key otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, build_config

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "conf" / "protocol"


@dataclass
class Protocol:
    """Test-time protocol settings; recorded next to every metric they produce.

    Attributes:
        name: protocol name, e.g. "ifseg", "zegclip", "zsseg", "tcl".
        short_side: target short side in pixels after resizing (keep aspect ratio).
        max_long_side: cap on the long side in pixels (mmseg img_scale=(max_long_side, short_side)).
        mode: "whole" (one forward on the resized image) or "slide" (mmseg sliding window).
        crop: slide window side in pixels (square).
        stride: slide stride in pixels; must satisfy 0 < stride <= crop.
        seen_penalty: subtracted from seen-class scores before the argmax (ZegCLIP inductive: 0.1 on sigmoid).
        score: "softmax" | "sigmoid" | "raw": what the penalty and argmax act on.
        background: dataset background policy recorded with the metrics: "ignore" (bg GT -> 255),
            "class" (bg is a class), "stuff_names" (stuff words in the vocabulary map to bg).
        knn_postprocess: whether IFSeg's K-NN post-processing is on (the predictor does it and returns
            propagated probabilities, which the engine resizes without a score transform).
    """

    name: str = "ifseg"
    short_side: int = 512
    max_long_side: int = 2048
    mode: Literal["whole", "slide"] = "whole"
    crop: int = 512
    stride: int = 426
    seen_penalty: float = 0.0
    score: Literal["softmax", "sigmoid", "raw"] = "softmax"
    background: Literal["ignore", "class", "stuff_names"] = "ignore"
    knn_postprocess: bool = False

    def __post_init__(self) -> None:
        if self.short_side <= 0 or self.max_long_side <= 0:
            raise ValueError(f"protocol sizes must be positive, got {self.short_side}/{self.max_long_side}")
        if not 0 < self.stride <= self.crop:
            raise ValueError(f"protocol.stride must satisfy 0 < stride <= crop, got {self.stride}/{self.crop}")


def preset_names() -> list[str]:
    """The names of the presets in `PROTOCOL_DIR`."""
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def protocol_fields(preset: str, overrides: Sequence[Mapping[str, Any]] = (), key: str = "protocol"
                    ) -> dict[str, Any]:
    """Fields of preset `conf/protocol/<preset>.yaml` with the override mappings applied in order.

    Args:
        preset: the preset's name.
        overrides: mappings of `Protocol` fields, later ones win.
        key: the config key of `preset` for messages, e.g. "eval.methods[0].protocol".

    Raises:
        ConfigError: no such preset, or a key that is not a `Protocol` field.
    """
    import yaml

    path = PROTOCOL_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"{key}={preset!r}: no preset {path}; known presets: {preset_names()}")
    values = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "_target_"}
    valid = sorted(f.name for f in fields(Protocol))
    for source, mapping in ((str(path), values), *((f"{key} overrides", o) for o in overrides)):
        unknown = sorted(set(mapping) - set(valid))
        if unknown:
            raise ConfigError(f"{source}: unknown protocol key(s) {unknown}; valid keys: {valid}")
        values.update(mapping)
    return values


def build_protocol(values: Mapping[str, Any], key: str = "protocol") -> Protocol:
    """The `Protocol` of `values` (all its fields); ConfigError naming `key` for a bad value."""
    return build_config(Protocol, values, key)


def load_protocol(preset: str, overrides: Sequence[Mapping[str, Any]] = (), key: str = "protocol") -> Protocol:
    """Preset `preset` with `overrides` applied in order, validated (see `protocol_fields`, `build_protocol`)."""
    return build_protocol(protocol_fields(preset, overrides, key), key)
