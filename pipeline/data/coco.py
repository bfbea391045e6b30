"""COCO-format JSON (instances or stuff) rasterised to semantic label maps with pycocotools.

Choices where the sources are silent (documented here, asserted in tests):

* Overlaps: annotations are drawn largest area first, so a smaller object lying on a larger one
  keeps its pixels (a person in front of a sofa stays "person").
* Crowd annotations (``iscrowd=1``, RLE) are drawn like any other: for semantic segmentation a
  crowd of people is still "person".
* Pixels no annotation covers become the vocabulary's ``background`` class when it has one and
  ``unannotated="auto"``, else ignore.
* Categories the vocabulary lacks are drawn as ignore (their pixels are known not to be background)
  and listed in ``unmapped_categories``.
"""

from __future__ import annotations

import json
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.images import DEFAULT_MAX_PIXELS
from pipeline.data.listing import folder_listing, join_url, read_text
from pipeline.data.records import (
    ImageRecord,
    InputIdentity,
    ItemRef,
    check_unique_keys,
    failed_record,
    load_image_record,
    refs_identity,
    resolve_vocab,
    sanitize_key,
)
from pipeline.fingerprint import digest

if TYPE_CHECKING:
    from pipeline.data.vocab import Vocabulary


def normalize_name(name: str) -> str:
    """Lower-case and drop everything but letters and digits: ``"tv/monitor"`` -> ``"tvmonitor"``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise one COCO ``segmentation`` (polygon list, uncompressed or compressed RLE).

    Args:
        segmentation: The annotation's ``segmentation`` field; polygons are ``[[x0, y0, x1, y1, ...], ...]``
            in pixel coordinates.
        height: Image height (pixels).
        width: Image width (pixels).

    Returns:
        ``HxW uint8`` mask, 1 inside.

    Raises:
        ValueError: Malformed segmentation (e.g. a polygon with fewer than 3 points).
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [poly for poly in segmentation if len(poly) >= 6]
        if not polygons:
            raise ValueError("no polygon with at least 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
    with warnings.catch_warnings():  # pycocotools 2.0.x trips numpy 2's __array__(copy=) deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


@dataclass
class COCOAdapter:
    """Images listed in a COCO JSON with label maps drawn from its annotations.

    Attributes:
        annotation_file: Path or fsspec URL of the COCO JSON (instances or stuff).
        vocab: Vocabulary name/path or object (required).
        image_root: Folder the images' ``file_name`` is relative to; None = the JSON's folder.
        split: Split name used in keys (``"{name}_{split}_{file stem}"``).
        name: Dataset name used in keys and ``meta["dataset"]``.
        category_map: ``"by_name"`` matches category names to vocabulary names and variants after
            :func:`normalize_name`; ``"by_id"`` looks category ids up in the vocabulary's ``source_ids``.
        unannotated: ``"auto"`` (background class if the vocabulary has one, else ignore),
            ``"background"`` or ``"ignore"``.
        with_labels: Draw label maps; False gives an unlabeled image pool.
        max_pixels: Largest accepted image size (pixels).
    """

    annotation_file: str
    vocab: str | Vocabulary | None = None
    image_root: str | None = None
    split: str = "val"
    name: str = "coco"
    category_map: str = "by_name"
    unannotated: str = "auto"
    with_labels: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    unmapped_categories: tuple[str, ...] = field(init=False, default=())
    _category_to_train_id: dict[int, int] = field(init=False, repr=False, default_factory=dict)
    _fill_value: int = field(init=False, repr=False, default=0)
    _dataset: dict | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self.vocab = resolve_vocab(self.vocab, None, "coco")
        if self.category_map not in ("by_name", "by_id"):
            raise ValueError(f"coco: category_map must be 'by_name' or 'by_id', got {self.category_map!r}")
        if self.image_root is None:
            self.image_root = posixpath.dirname(self.annotation_file) or "."
        self._fill_value = self._resolve_fill_value()
        self._category_to_train_id = self._map_categories(self._load()["categories"])

    def __getstate__(self) -> dict:
        """Pickle without the parsed JSON; a worker re-reads it on first :meth:`load`."""
        state = self.__dict__.copy()
        state["_dataset"] = None
        return state

    def _load(self) -> dict:
        if self._dataset is None:
            data = json.loads(read_text(self.annotation_file))
            by_image: dict[int, list[dict]] = {}
            for annotation in data.get("annotations", []):
                by_image.setdefault(annotation["image_id"], []).append(annotation)
            data["images_by_id"] = {image["id"]: image for image in data["images"]}
            data["annotations_by_image"] = by_image
            self._dataset = data
        return self._dataset

    def _resolve_fill_value(self) -> int:
        if self.unannotated not in ("auto", "background", "ignore"):
            raise ValueError(f"coco: unannotated must be 'auto', 'background' or 'ignore', got {self.unannotated!r}")
        normalized = [normalize_name(name) for name in self.vocab.names]
        has_background = "background" in normalized
        if self.unannotated == "background" and not has_background:
            raise ValueError(f"coco: unannotated=background but vocabulary '{self.vocab.name}' has no 'background'")
        if self.unannotated != "ignore" and has_background:
            return normalized.index("background")
        return self.vocab.ignore_index

    def _name_lookup(self) -> dict[str, int]:
        """Normalised official names first, then every variant name that is not already taken."""
        lookup = {normalize_name(name): train_id for train_id, name in enumerate(self.vocab.names)}
        for variant_names in self.vocab.variants.values():
            for train_id, name in enumerate(variant_names):
                lookup.setdefault(normalize_name(name), train_id)
        return lookup

    def _map_categories(self, categories: list[dict]) -> dict[int, int]:
        """COCO category id -> train id; raises ValueError when nothing maps (a vocabulary mismatch)."""
        if self.category_map == "by_id":
            if self.vocab.source_ids is None:
                raise ValueError(f"coco: category_map=by_id needs source_ids in vocabulary '{self.vocab.name}'")
            by_id = {source_id: train_id for train_id, source_id in enumerate(self.vocab.source_ids)}
            mapping = {cat["id"]: by_id[cat["id"]] for cat in categories if cat["id"] in by_id}
        else:
            lookup = self._name_lookup()
            mapping = {cat["id"]: lookup[normalize_name(cat["name"])] for cat in categories
                       if normalize_name(cat["name"]) in lookup}
        self.unmapped_categories = tuple(sorted(cat["name"] for cat in categories if cat["id"] not in mapping))
        if categories and not mapping:
            raise ValueError(f"coco: no category of {self.annotation_file} maps to vocabulary '{self.vocab.name}' "
                             f"({self.category_map}); check `vocab` or `category_map`")
        return mapping

    def list_items(self) -> list[ItemRef]:
        """One item per JSON image, sorted by key; ``extra = (image_id,)``.

        ``version`` = the image file's listing version (one ``find`` of ``image_root``) and a digest of the image's
        JSON entry and its annotations, so editing one image's annotations changes only that item.
        """
        data = self._load()
        files = {rel: version for rel, (_, version) in folder_listing(self.image_root).items()}
        refs = []
        for image in data["images"]:
            stem = posixpath.splitext(posixpath.basename(image["file_name"]))[0]
            key = sanitize_key(f"{self.name}_{self.split}_{stem}" if self.split else f"{self.name}_{stem}")
            label_source = self.annotation_file if self.with_labels else None
            annotations = data["annotations_by_image"].get(image["id"], []) if self.with_labels else []
            version = f"{files.get(posixpath.normpath(image['file_name']), 'missing')}|{digest([image, annotations])}"
            refs.append(ItemRef(key, join_url(self.image_root, image["file_name"]), label_source, (image["id"],),
                                version))
        refs.sort(key=lambda ref: ref.key)
        check_unique_keys(refs)
        return refs

    def input_identity(self) -> InputIdentity:
        """Per image: file listing version + its annotations' digest; adapter-wide: the category table."""
        return refs_identity(self.list_items(), digest(self._load()["categories"]))

    def draw_label(self, image_id: int) -> tuple[np.ndarray, list[str]]:
        """Rasterise all annotations of one image.

        Returns:
            ``(HxW train ids of vocab.label_dtype, notes)`` with H, W from the JSON image entry.
        """
        data = self._load()
        info = data["images_by_id"][image_id]
        height, width = int(info["height"]), int(info["width"])
        label = np.full((height, width), self._fill_value, dtype=self.vocab.label_dtype)
        notes = []
        annotations = sorted(data["annotations_by_image"].get(image_id, []), key=lambda ann: (-ann.get("area", 0),
                                                                                            ann.get("id", 0)))
        for annotation in annotations:
            try:
                mask = annotation_mask(annotation["segmentation"], height, width).astype(bool)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                notes.append(f"annotation {annotation.get('id')} skipped: {exc}")
                continue
            label[mask] = self._category_to_train_id.get(annotation["category_id"], self.vocab.ignore_index)
        return label, notes

    def load(self, ref: ItemRef) -> ImageRecord:
        """Decode the image and draw its label map; never raises on bad data."""
        record = load_image_record(ref, self.name, None, self.max_pixels)
        record.meta["image_id"] = ref.extra[0]
        if not record.ok or not self.with_labels:
            return record
        label, notes = self.draw_label(ref.extra[0])
        record.meta["notes"] = record.meta["notes"] + [f"label: {note}" for note in notes]
        if label.shape != record.image.shape[:2]:
            return failed_record(ref.key, record.meta, f"annotation size {label.shape[0]}x{label.shape[1]} != image "
                                 f"size {record.image.shape[0]}x{record.image.shape[1]} (HxW)")
        record.label = label
        return record
