"""Typed configs and the shared pre-compute checks: every bad value fails here, on the driver, naming its key.

A node's YAML is turned into its stage's `Config` dataclass by `build_config`, recursively: nested dataclass
fields (model configs, method knobs, `resources`) are built the same way, so a typo anywhere (`pseudolabel.sam.
chekpoint`, `train_ifseg.ifseg.lrr`) is a `ConfigError` with the full key before any work starts, never a
`TypeError` on a Ray worker. The checks below (vocabulary, input adapter, choices, bounds, `device: auto`) are
the only copies of those rules; stages call them instead of writing their own.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.data.records import Adapter
    from pipeline.data.vocab import Vocabulary


class ConfigError(ValueError):
    """A bad configuration, found before any compute; the message names the key and the fix."""


def build_config(config_cls: type, values: Mapping[str, Any] | None, key: str) -> Any:
    """Instantiate a Config dataclass from plain data, rejecting unknown keys and wrong scalar types.

    Args:
        config_cls: a dataclass type (anything else gets `dict(values)`).
        values: the YAML mapping; `stage` and `inputs` (DAG keys) are skipped. None = all defaults.
        key: the config path of `values` for messages, e.g. "pseudolabel" or "pseudolabel.sam".

    Returns:
        The dataclass instance; fields whose type is a dataclass are built recursively from mappings.
    """
    values = dict(values or {})
    if not dataclasses.is_dataclass(config_cls):
        return values
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(values) - known - {"stage", "inputs"})
    if unknown:
        names = ", ".join(f"{key}.{name}" for name in unknown)
        raise ConfigError(f"{names}: unknown config key{'s' if len(unknown) > 1 else ''}; valid keys of {key}: "
                          f"{sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        if name not in known:
            continue
        hint = _dataclass_of(hints[name])
        if hint is not None and isinstance(value, Mapping):
            value = build_config(hint, value, f"{key}.{name}")
        else:
            _check_type(value, hints[name], f"{key}.{name}")
        kwargs[name] = value
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as error:  # a dataclass' own __post_init__ validation
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{key}: {error}") from None


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass in `X` or `X | None`, else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    members = [a for a in typing.get_args(hint) if a is not type(None)]
    return members[0] if len(members) == 1 and dataclasses.is_dataclass(members[0]) else None


def _check_type(value: Any, hint: Any, key: str) -> None:
    if value is None:
        return
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = [a for a in typing.get_args(hint) if a is not type(None)] if is_union else [hint]
    for member in members:
        origin = typing.get_origin(member) or member
        if origin is typing.Literal:
            if value in typing.get_args(member):
                return
        elif origin in (int, float, bool, str):
            allowed = (int, float) if origin is float else (origin,)
            if isinstance(value, allowed) and not (origin is not bool and isinstance(value, bool)):
                return
        elif origin in (list, tuple):
            if isinstance(value, list | tuple):
                return
        elif origin is dict:
            if isinstance(value, Mapping):
                return
        else:
            return  # Any, Literal-free unions of other types: not checked here
    expected = " or ".join(
        f"one of {list(typing.get_args(m))}" if typing.get_origin(m) is typing.Literal
        else getattr(typing.get_origin(m) or m, "__name__", str(m)) for m in members)
    raise ConfigError(f"{key}={value!r}: expected {expected}")


def choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    """ConfigError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: choose one of {list(allowed)}")


def at_least(key: str, value: float | None, minimum: float) -> None:
    """ConfigError when `value` (None passes) is below `minimum`."""
    if value is not None and value < minimum:
        raise ConfigError(f"{key}={value}: must be >= {minimum}")


def checked_vocab(name: str, key: str) -> Vocabulary:
    """The vocabulary `name` (a conf/vocabularies name or a YAML path); ConfigError naming `key` when it cannot load."""
    from pipeline.data.vocab import load_vocab

    try:
        return load_vocab(name)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as error:
        raise ConfigError(f"{key}={name!r}: {error}") from None


def checked_templates(name: str, key: str) -> tuple[str, ...]:
    """The prompt-template set `name` of `pipeline.models.prompts`."""
    from pipeline.models.prompts import get_templates

    try:
        return get_templates(name)
    except KeyError as error:
        raise ConfigError(f"{key}={name!r}: {error.args[0]}") from None


def checked_adapter(data: Mapping[str, Any], vocab: Vocabulary, node: str) -> Adapter:
    """The input adapter of node `node`'s `data:` mapping; its `vocab` defaults to the stage's and must match it.

    Args:
        data: `{kind: ..., <the kind's fields>}` (`pipeline.data.registry.build_adapter`).
        vocab: the stage's vocabulary (`<node>.vocab`).
        node: the node name; errors name `<node>.data...`.
    """
    from pipeline.data.registry import ADAPTERS, adapter_fields, build_adapter

    key = f"{node}.data"
    if not isinstance(data, Mapping) or data.get("kind") not in ADAPTERS:
        kind = data.get("kind") if isinstance(data, Mapping) else data
        raise ConfigError(f"{key}.kind={kind!r}: set it to one of {sorted(ADAPTERS)} "
                          f"(e.g. '{key}={{kind: folder, root: /images}}')")
    data = dict(data)
    if "vocab" in adapter_fields(data["kind"]) and data.get("vocab") is None:
        data["vocab"] = vocab
    try:
        adapter = build_adapter(data)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise ConfigError(f"{key}: {error}") from None
    theirs = getattr(adapter, "vocab", None)
    if theirs is not None and tuple(theirs.names) != tuple(vocab.names):
        raise ConfigError(f"{key}.vocab={theirs.name!r} differs from {node}.vocab={vocab.name!r}: the "
                          f"ground-truth ids would mean other classes; set {node}.vocab={theirs.name} or drop "
                          f"{key}.vocab")
    return adapter


def resolve_device(device: str) -> str:
    """`auto` -> "cuda" when torch sees a GPU, else "cpu"; any other value as given. Worker side (imports torch)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
