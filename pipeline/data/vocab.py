"""Vocabularies: class names, prompt-name variants, seen/unseen splits and coarse groups, as data.

A vocabulary lives in ``conf/vocabularies/<name>.yaml`` (schema in ``conf/vocabularies/README.md``) and is loaded
into an immutable :class:`Vocabulary`. The folder is not named ``vocab``: Hydra would take it for a config group and
reject the top-level override ``vocab=voc_20``. The list index of a class is its *train id*: the value written into
label maps (uint8 with ``ignore_index`` 255, or uint16 with 65535 when a vocabulary has more than 255 classes).

Choices where the sources are silent:
    * A variant (e.g. ``ifseg``, ``maskclip``) names only the classes whose spelling differs; every other class
      falls back to its official name, and asking for a variant that no class defines returns the official names.
    * Official names and the names of every variant must be unique, so that no two classes share a prompt.
    * ``subset`` keeps the parent's unseen flags, coarse groups, source ids and variants, in the order given.
    * ``digest`` hashes the vocabulary's name and content, not its free-text description.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

UINT8_IGNORE = 255
UINT16_IGNORE = 65535
_YAML_SUFFIXES = (".yaml", ".yml")


def _duplicates(values: Sequence[str]) -> list[str]:
    """Return the values that occur more than once, in first-occurrence order."""
    seen: set[str] = set()
    repeated: list[str] = []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    return repeated


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of classes; the index of a class in ``names`` is its train id.

    Attributes:
        name: Identifier of the vocabulary (the YAML file stem, e.g. ``coco_stuff_171``).
        names: Official class names, index = train id (0-based, contiguous).
        variants: Variant name -> full tuple of ``num_classes`` prompt names (official name where a class has none).
        unseen_ids: Sorted train ids of the unseen (novel) classes; empty when the vocabulary has no split.
        coarse: Coarse group name per class (hierarchical word grids), or None.
        source_ids: The dataset's raw id per class (COCO category id, raw PNG value), or None.
        ignore_index: Label value that marks ignored pixels (255 for uint8 maps, 65535 for uint16 maps).
    """

    name: str
    names: tuple[str, ...]
    variants: dict[str, tuple[str, ...]]
    unseen_ids: tuple[int, ...]
    coarse: tuple[str, ...] | None
    source_ids: tuple[int, ...] | None
    ignore_index: int = UINT8_IGNORE

    def __post_init__(self) -> None:
        """Normalise to tuples (dropping variants identical to the official names) and validate.

        Raises:
            ValueError: On a broken invariant, naming the offending key.
        """
        names = tuple(self.names)
        variants = {key: tuple(values) for key, values in sorted(self.variants.items()) if tuple(values) != names}
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "variants", variants)
        object.__setattr__(self, "unseen_ids", tuple(int(i) for i in self.unseen_ids))
        if self.coarse is not None:
            object.__setattr__(self, "coarse", tuple(self.coarse))
        if self.source_ids is not None:
            object.__setattr__(self, "source_ids", tuple(self.source_ids))
        _validate(self)

    def __hash__(self) -> int:
        """Hash of the content digest (the ``variants`` dict makes the generated field hash impossible)."""
        return hash(self.digest())

    @property
    def num_classes(self) -> int:
        """Number of classes (train ids are ``0 .. num_classes - 1``)."""
        return len(self.names)

    @property
    def seen_ids(self) -> tuple[int, ...]:
        """Sorted train ids of the seen (base) classes: every class not in ``unseen_ids``."""
        unseen = set(self.unseen_ids)
        return tuple(i for i in range(self.num_classes) if i not in unseen)

    @property
    def label_dtype(self) -> type[np.unsignedinteger]:
        """Dtype of label maps: ``np.uint8`` up to 255 classes, else ``np.uint16``."""
        return np.uint8 if self.num_classes <= UINT8_IGNORE else np.uint16

    def prompt_names(self, variant: str | None = None) -> tuple[str, ...]:
        """Class names to put into text prompts.

        Args:
            variant: A variant key such as ``"ifseg"`` or ``"maskclip"``; None (or a variant that no class of
                this vocabulary defines) gives the official names.

        Returns:
            ``num_classes`` names in train-id order.
        """
        if variant is None:
            return self.names
        return self.variants.get(variant, self.names)

    def coarse_groups(self) -> dict[str, tuple[int, ...]]:
        """Coarse group -> fine train ids (ascending), groups in order of first appearance.

        Raises:
            ValueError: When the vocabulary has no coarse groups.
        """
        if self.coarse is None:
            raise ValueError(f"vocabulary {self.name!r} has no 'coarse' groups")
        groups: dict[str, list[int]] = {}
        for train_id, group in enumerate(self.coarse):
            groups.setdefault(group, []).append(train_id)
        return {group: tuple(ids) for group, ids in groups.items()}

    def subset(self, names_or_ids: Sequence[str | int], name: str) -> Vocabulary:
        """A new vocabulary of the given classes, in the given order (new train ids = positions).

        Args:
            names_or_ids: Official names or train ids of this vocabulary (may be mixed); no repeats.
            name: Name of the new vocabulary.

        Returns:
            A vocabulary that keeps these classes' variants, coarse groups, source ids, unseen flags and
            ``ignore_index``.

        Raises:
            ValueError: On an unknown name or id, or a class selected twice.
        """
        picked = [self._train_id(item) for item in names_or_ids]
        if len(set(picked)) != len(picked):
            raise ValueError(f"subset of {self.name!r} selects a class twice: {list(names_or_ids)}")
        unseen = set(self.unseen_ids)
        return Vocabulary(
            name=name,
            names=tuple(self.names[i] for i in picked),
            variants={key: tuple(values[i] for i in picked) for key, values in self.variants.items()},
            unseen_ids=tuple(new for new, old in enumerate(picked) if old in unseen),
            coarse=None if self.coarse is None else tuple(self.coarse[i] for i in picked),
            source_ids=None if self.source_ids is None else tuple(self.source_ids[i] for i in picked),
            ignore_index=self.ignore_index,
        )

    def digest(self) -> str:
        """SHA-256 hex digest of the canonical JSON of ``to_dict()`` (stable across runs and machines)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict in the YAML schema (variants listed only where they differ from the official name)."""
        classes = []
        for train_id, official in enumerate(self.names):
            entry: dict[str, Any] = {"name": official}
            differing = {k: v[train_id] for k, v in sorted(self.variants.items()) if v[train_id] != official}
            if differing:
                entry["variants"] = differing
            if self.coarse is not None:
                entry["coarse"] = self.coarse[train_id]
            if self.source_ids is not None:
                entry["source_id"] = self.source_ids[train_id]
            classes.append(entry)
        return {
            "name": self.name,
            "ignore_index": self.ignore_index,
            "classes": classes,
            "unseen": [self.names[i] for i in self.unseen_ids],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        """Build a vocabulary from the YAML schema (also the output of ``to_dict``); extra keys are ignored.

        Raises:
            ValueError: When a required key is missing or a value breaks the schema.
        """
        return _from_schema(data)

    def _train_id(self, item: str | int) -> int:
        """Train id of an official name or a train id; ValueError when unknown."""
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= item < self.num_classes:
                raise ValueError(f"train id {item} out of range for {self.name!r} ({self.num_classes} classes)")
            return int(item)
        if isinstance(item, str) and item in self.names:
            return self.names.index(item)
        raise ValueError(f"{item!r} is not a class of vocabulary {self.name!r}")


def _validate(vocab: Vocabulary) -> None:
    """Check a vocabulary's invariants; raises ValueError naming the offending key."""
    n = vocab.num_classes
    if n == 0:
        raise ValueError(f"vocabulary {vocab.name!r}: 'classes' is empty")
    if not all(isinstance(x, str) and x.strip() for x in vocab.names):
        raise ValueError(f"vocabulary {vocab.name!r}: every class 'name' must be a non-empty string: {vocab.names}")
    if repeated := _duplicates(vocab.names):
        raise ValueError(f"vocabulary {vocab.name!r}: duplicate class names {repeated}")
    for key, values in vocab.variants.items():
        if len(values) != n or not all(isinstance(x, str) and x.strip() for x in values):
            raise ValueError(f"vocabulary {vocab.name!r}: variant {key!r} needs {n} non-empty string names")
        if repeated := _duplicates(values):
            raise ValueError(f"vocabulary {vocab.name!r}: variant {key!r} repeats names {repeated}")
    if list(vocab.unseen_ids) != sorted(set(vocab.unseen_ids)) or any(not 0 <= i < n for i in vocab.unseen_ids):
        raise ValueError(f"vocabulary {vocab.name!r}: 'unseen_ids' must be sorted unique ids in [0, {n})")
    for key, values in (("coarse", vocab.coarse), ("source_id", vocab.source_ids)):
        if values is not None and len(values) != n:
            raise ValueError(f"vocabulary {vocab.name!r}: {key!r} must be given for all {n} classes or none")
    wanted_ignore = UINT8_IGNORE if n <= UINT8_IGNORE else UINT16_IGNORE
    if vocab.ignore_index != wanted_ignore:
        raise ValueError(
            f"vocabulary {vocab.name!r}: ignore_index must be {wanted_ignore} for {n} classes "
            f"(uint8 maps use 255, uint16 maps 65535), got {vocab.ignore_index}"
        )


def _optional_per_class(classes: Sequence[Mapping[str, Any]], key: str, name: str) -> tuple[Any, ...] | None:
    """The values of ``key`` across classes, or None when no class has it; ValueError when only some do."""
    present = [key in entry for entry in classes]
    if not any(present):
        return None
    if not all(present):
        missing = [entry.get("name") for entry, has in zip(classes, present, strict=True) if not has]
        raise ValueError(f"vocabulary {name!r}: {key!r} must be given for all classes or none; missing for {missing}")
    return tuple(entry[key] for entry in classes)


def _from_schema(data: Mapping[str, Any]) -> Vocabulary:
    """Parse the YAML schema into a Vocabulary (see ``Vocabulary.from_dict``)."""
    for key in ("name", "classes"):
        if key not in data:
            raise ValueError(f"vocabulary is missing the required key {key!r}")
    name, classes = str(data["name"]), data["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, Mapping) and "name" in c for c in classes):
        raise ValueError(f"vocabulary {name!r}: 'classes' must be a list of mappings, each with a 'name'")
    names = tuple(entry["name"] for entry in classes)
    variant_keys = sorted({key for entry in classes for key in (entry.get("variants") or {})})
    variants = {key: tuple((e.get("variants") or {}).get(key, e["name"]) for e in classes) for key in variant_keys}
    unseen = data.get("unseen") or []
    unknown = [u for u in unseen if u not in names]
    if unknown:
        raise ValueError(f"vocabulary {name!r}: 'unseen' names {unknown} are not official class names")
    source_ids = _optional_per_class(classes, "source_id", name)
    if source_ids is not None and not all(isinstance(s, int) and not isinstance(s, bool) for s in source_ids):
        raise ValueError(f"vocabulary {name!r}: every 'source_id' must be an integer")
    default_ignore = UINT8_IGNORE if len(names) <= UINT8_IGNORE else UINT16_IGNORE
    return Vocabulary(
        name=name,
        names=names,
        variants=variants,
        unseen_ids=tuple(sorted({names.index(u) for u in unseen if isinstance(u, str)})),
        coarse=_optional_per_class(classes, "coarse", name),
        source_ids=source_ids,
        ignore_index=int(data.get("ignore_index", default_ignore)),
    )


def vocab_dir() -> Path:
    """``<repo>/conf/vocabularies``, resolved from this file's location (independent of the working directory)."""
    return Path(__file__).resolve().parents[2] / "conf" / "vocabularies"


def list_vocabs() -> list[str]:
    """Sorted names of the vocabularies shipped in ``conf/vocabularies``."""
    return sorted(path.stem for path in vocab_dir().glob("*.yaml"))


def load_vocab(name_or_path: str | Path) -> Vocabulary:
    """Load a vocabulary by name (a file in ``conf/vocabularies``) or from a path to a YAML file.

    Args:
        name_or_path: ``"coco_stuff_171"`` or ``"path/to/my_vocab.yaml"``. The file's ``name`` key must equal
            its stem.

    Raises:
        ValueError: When the name is unknown (the message lists the available names), the file breaks the
            schema, or ``name`` differs from the file stem.
        TypeError: When the YAML file does not hold a mapping.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(_YAML_SUFFIXES) or path.is_file()):
        path = vocab_dir() / f"{text}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown vocabulary {text!r}; available: {', '.join(list_vocabs())} (or a .yaml path)")
    if not path.is_file():
        raise ValueError(f"vocabulary file {path} does not exist")
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, Mapping):
        raise TypeError(f"vocabulary file {path} must hold a mapping with 'name' and 'classes'")
    if str(data.get("name")) != path.stem:
        raise ValueError(
            f"vocabulary file {path}: 'name' is {data.get('name')!r} but must equal the stem {path.stem!r}"
        )
    return Vocabulary.from_dict(data)
