"""Command-line overrides: our one rule on top of Hydra's grammar, and the fixes added to configuration errors.

The rule: `<node>.data={kind: ..., ...}` replaces the node's input-adapter mapping instead of merging into it
(`split_data_overrides`). The fixes: `config_hint` adds to an error message how to write what failed (Hydra's
merge-into-a-mapping and grammar errors) and, when the message names a key whose value comes from an
interpolation such as `${coco_root}`, which top-level key to set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from pipeline.config import ConfigError

INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")
GRAMMAR_FIX = ("\nfix: write key=value; quote values holding spaces, '=' or brackets (key='a=b'); lists are "
               "key=[a,b], mappings key={a:1,b:2} (in shell quotes: 'pseudolabel.data={kind:folder,root:/images}')")


def split_data_overrides(overrides: Sequence[str]) -> tuple[list[str], list[tuple[str, Any]]]:
    """Separate `<node>.data=<mapping>` overrides, returned as (key, value) replacements, from the rest."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    rest, replacements = [], []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as error:  # the grammar's errors (Hydra wraps them in OverrideParseException later)
            key = text.split("=", 1)[0]
            raise ConfigError(f"{key}: cannot parse the override {text!r} ({error}){GRAMMAR_FIX}") from None
        key = override.key_or_group
        if override.type == OverrideType.CHANGE and key.endswith(".data") and isinstance(override.value(), dict):
            replacements.append((key, override.value()))
        else:
            rest.append(text)
    return rest, replacements


def config_hint(error: BaseException, raw: Any = None, overrides: Sequence[str] = ()) -> str:
    """Text to append to `error`'s message: how to fix the override or which interpolated key to set.

    Args:
        error: a ConfigError, Hydra or OmegaConf exception, or a YAML error.
        raw: the composed, unresolved OmegaConf config when composing succeeded, else None.
        overrides: the command line's overrides.
    """
    from hydra.errors import OverrideParseException

    text, cause = str(error), str(error.__cause__ or "")
    if isinstance(error, OverrideParseException):
        return GRAMMAR_FIX
    overridden = re.match(r"Could not override '([^']+)'", text)
    if overridden and "not in struct" in cause:
        key = overridden.group(1)
        values = [text.split("=", 1)[1] for text in overrides if text.split("=", 1)[0] == key and "=" in text]
        data = re.match(r"^(.+\.data)\.\w+$", key)
        if data:
            return (f"\nfix: {data.group(1)} is the preset's input adapter and has no such option; to read other "
                    f"input replace the whole mapping: '{data.group(1)}={{kind:folder,root:/path/to/images}}'")
        if values and values[0].lstrip().startswith("{"):
            return (f"\nfix: {key}={{...}} merges into the preset's mapping, which lacks one of its keys; to replace "
                    f"the mapping write '~{key}' '+{key}={{...}}', to set one field {key}.<field>=<value>")
        return (f"\nfix: the preset has no key {key} (check its spelling: conf/stage/<kind>.yaml lists every knob); "
                f"to add a new key write +{key}=<value>")
    appended = re.search(r"An item is already at '([^']+\.data)'", text)
    if appended:
        return f"\nfix: write {appended.group(1)}={{kind:...,...}} without '+': it replaces the node's input adapter"
    foreign = re.search(r"(\S+)\.data: input adapter '\w+' has no option", text)
    if foreign:
        return (f"\nfix: to use another kind of input, replace the whole mapping: "
                f"'{foreign.group(1)}.data={{kind:folder,root:/path/to/images}}'")
    if "yaml" in type(error).__module__:
        return "\nfix: the YAML file named above is malformed; correct the line it points at"
    hints = [f"{key} is {value}: set {value[2:-1]}=<value>" for key, value in interpolated_keys(raw)
             if re.search(rf"(^|[\s'(]){re.escape(key)}\b", text)]
    return f"\nfix: {'; '.join(hints)}" if hints else ""


def interpolated_keys(raw: Any) -> Iterator[tuple[str, str]]:
    """(dotted key, "${source}") for every value of `raw` that is exactly one plain interpolation."""
    if raw is None:
        return
    from omegaconf import OmegaConf

    yield from _walk(OmegaConf.to_container(raw, resolve=False), "")


def _walk(value: Any, prefix: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _walk(inner, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _walk(inner, f"{prefix}[{index}]")
    elif isinstance(value, str) and INTERPOLATION.match(value):
        yield prefix, value
