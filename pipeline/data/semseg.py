"""Adapters for semantic-segmentation datasets stored as image files paired with label PNGs.

One base class pairs ``{root}/{image_dir}/<rel>/<stem>{image_suffix}`` with
``{root}/{label_dir}/<rel>/<stem>{label_suffix}``; each kind fixes the layout defaults, the default
vocabulary and the raw-value -> train-id table (all tables live in :mod:`pipeline.data.labels`).
Directory templates may contain ``{split}``. Keys are ``"{name}_{split}_{stem}"`` with characters
outside ``[A-Za-z0-9_-]`` replaced by ``_`` (e.g. ``"camvid_val_0016E5_07959"``).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from pipeline.data import labels as label_ids
from pipeline.data.images import DEFAULT_MAX_PIXELS, read_label_png
from pipeline.data.listing import folder_listing, join_url, list_files_versioned, read_text
from pipeline.data.records import (
    ImageRecord,
    InputIdentity,
    ItemRef,
    check_unique_keys,
    load_image_record,
    refs_identity,
    resolve_vocab,
    sanitize_key,
)

if TYPE_CHECKING:
    from pipeline.data.vocab import Vocabulary


@dataclass
class PairedSemsegAdapter:
    """Base for image/label-PNG datasets (subclasses set defaults and :meth:`_build_lut`).

    Attributes:
        root: Dataset root, local path or fsspec URL.
        split: Split name, substituted for ``{split}`` in the directory templates and used in keys.
        vocab: Vocabulary name/path or object; None picks the kind's default.
        name: Dataset name used in keys and ``meta["dataset"]``.
        image_dir: Image folder template relative to ``root``.
        label_dir: Label folder template relative to ``root``.
        image_suffix: Image file ending (the rest of the file name is the stem).
        label_suffix: Label file ending replacing ``image_suffix``.
        list_file: Optional list-file template relative to ``root``; each line's first token names an
            image (path or stem; only its stem is used). Listed images that do not exist become
            failed records, never silent drops. None or ``""`` lists ``image_dir`` instead (use ``""`` in
            configs: None values are dropped there so that defaults apply).
        recursive: Search sub-folders of ``image_dir`` (Cityscapes cities).
        with_labels: Load label maps; False treats the dataset as an unlabeled image pool.
        max_pixels: Largest accepted image size (pixels).
    """

    root: str
    split: str = "val"
    vocab: str | Vocabulary | None = None
    name: str = "semseg"
    image_dir: str = "images/{split}"
    label_dir: str = "annotations/{split}"
    image_suffix: str = ".jpg"
    label_suffix: str = ".png"
    list_file: str | None = None
    recursive: bool = False
    with_labels: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    _lut: np.ndarray = field(init=False, repr=False)

    default_vocab: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        self.vocab = resolve_vocab(self.vocab, self._default_vocab_name(), self.name)
        self._lut = self._build_lut()

    def _default_vocab_name(self) -> str | None:
        return self.default_vocab

    def _build_lut(self) -> np.ndarray:
        raise NotImplementedError

    def _require_classes(self, expected: int, hint: str) -> None:
        """Fail before any compute when the vocabulary does not match the label convention."""
        if self.vocab.num_classes != expected:
            raise ValueError(f"{self.name}: vocabulary '{self.vocab.name}' has {self.vocab.num_classes} classes but "
                             f"these labels have {expected}; set vocab={hint}")

    def _dir(self, template: str) -> str:
        return join_url(self.root, template.format(split=self.split))

    def _key(self, stem: str) -> str:
        return sanitize_key(f"{self.name}_{self.split}_{stem}" if self.split else f"{self.name}_{stem}")

    def _stems_from_list_file(self) -> list[tuple[str, str]]:
        """``(relative dir, stem)`` pairs named by the list file (its paths' folders are ignored)."""
        text = read_text(join_url(self.root, self.list_file.format(split=self.split)))
        pairs = []
        for line in text.splitlines():
            if not line.strip():
                continue
            base = posixpath.basename(line.split()[0])
            stem = base[: -len(self.image_suffix)] if base.endswith(self.image_suffix) else base
            pairs.append(("", stem))
        return pairs

    def _image_entries(self) -> list[tuple[str, str, str]]:
        """``(relative dir, stem, image version)`` of every item: the list file's names or the image listing."""
        image_root = self._dir(self.image_dir)
        if self.list_file:
            versions = {rel: version for rel, (_, version) in folder_listing(image_root, recursive=False).items()}
            return [(rel_dir, stem, versions.get(stem + self.image_suffix, "missing"))
                    for rel_dir, stem in self._stems_from_list_file()]
        images = list_files_versioned(image_root, (self.image_suffix,), recursive=self.recursive)
        if not images:
            raise FileNotFoundError(f"{self.name}: no '*{self.image_suffix}' files under {image_root}")
        return [(posixpath.dirname(rel), posixpath.basename(rel)[: -len(self.image_suffix)], version)
                for rel, (_, version) in images.items()]

    def list_items(self) -> list[ItemRef]:
        """Image/label pairs sorted by key; cheap (one listing of the image and of the label folder, or the list
        file and the image folder; nothing decoded). ``version`` holds the image's and the label's listing version.

        Raises:
            FileNotFoundError: When the image folder has no matching files (a wrong root or split).
        """
        image_root, label_root = self._dir(self.image_dir), self._dir(self.label_dir)
        labels = folder_listing(label_root, recursive=self.recursive) if self.with_labels else {}
        refs = []
        for rel_dir, stem, version in self._image_entries():
            label_rel = posixpath.join(rel_dir, stem + self.label_suffix)
            label = join_url(label_root, label_rel) if self.with_labels else None
            label_version = labels.get(label_rel, ("", "missing"))[1] if self.with_labels else ""
            refs.append(ItemRef(self._key(stem), join_url(image_root, rel_dir, stem + self.image_suffix), label,
                                version=f"{version}|{label_version}"))
        refs.sort(key=lambda ref: ref.key)
        check_unique_keys(refs)
        return refs

    def input_identity(self) -> InputIdentity:
        """One identity per image/label pair from the listings (paths, sizes, mtimes/ETags)."""
        return refs_identity(self.list_items())

    def decode_label(self, data: bytes) -> tuple[np.ndarray, list[str]]:
        """Label bytes -> ``(HxW train ids of vocab.label_dtype, notes)``.

        Raises:
            ImageDecodeError: Unreadable label file.
            ValueError: A colour label where indices are expected.
        """
        return label_ids.apply_lut(read_label_png(data, self.max_pixels), self._lut, self.vocab.ignore_index), []

    def load(self, ref: ItemRef) -> ImageRecord:
        """Load one item (see :func:`pipeline.data.records.load_image_record`); never raises on bad data."""
        decoder = self.decode_label if self.with_labels else None
        return load_image_record(ref, self.name, decoder, self.max_pixels)


@dataclass
class TrainIdAdapter(PairedSemsegAdapter):
    """Image folder + label-PNG folder whose values already are train ids of the vocabulary (kind ``semseg``).

    The default layout is MMSegmentation's ``img_dir/{split}/*.jpg`` + ``ann_dir/{split}/*.png``, which is what
    ``python -m pipeline.export --format mmseg`` writes (also Detectron2 ``sem_seg`` folders with other
    ``image_dir``/``label_dir``). Values ``0..C-1`` are kept, every other value (255, or 65535 for uint16 maps)
    becomes ignore. The vocabulary is required: it says what the ids mean.
    """

    split: str = "train"
    name: str = "semseg"
    image_dir: str = "img_dir/{split}"
    label_dir: str = "ann_dir/{split}"

    def _build_lut(self) -> np.ndarray:
        return np.arange(self.vocab.num_classes, dtype=self.vocab.label_dtype)

    def decode_label(self, data: bytes) -> tuple[np.ndarray, list[str]]:
        """Label bytes -> ``(HxW train ids of vocab.label_dtype, notes)``; a colour PNG raises ValueError."""
        raw = read_label_png(data, self.max_pixels)
        return label_ids.identity_train_ids(raw, self.vocab.num_classes, self.vocab.ignore_index,
                                            self.vocab.label_dtype), []


@dataclass
class CamVidAdapter(PairedSemsegAdapter):
    """SegNet CamVid: ``{split}/*.png`` + ``{split}annot/*.png``; raw 0..10 classes, 11 void -> ignore.

    Set ``list_file="{split}.txt"`` to follow the SegNet list files (their ``/SegNet/CamVid/`` prefix is ignored).
    """

    name: str = "camvid"
    image_dir: str = "{split}"
    label_dir: str = "{split}annot"
    image_suffix: str = ".png"
    default_vocab: ClassVar[str | None] = "camvid_11"

    def _build_lut(self) -> np.ndarray:
        self._require_classes(11, "camvid_11")
        return label_ids.camvid_lut(self.vocab.ignore_index, self.vocab.label_dtype)


@dataclass
class ADE20KAdapter(PairedSemsegAdapter):
    """ADEChallengeData2016: ``images/{split}/*.jpg`` + ``annotations/{split}/*.png`` (split: validation, training).

    Raw 0 = "other" -> ignore, raw 1..150 -> train ids 0..149 (detectron2/mmseg ``reduce_zero_label``).
    """

    split: str = "validation"
    name: str = "ade20k"
    default_vocab: ClassVar[str | None] = "ade20k_150"

    def _build_lut(self) -> np.ndarray:
        self._require_classes(150, "ade20k_150")
        return label_ids.ade20k_lut(self.vocab.ignore_index, self.vocab.label_dtype)


@dataclass
class CityscapesAdapter(PairedSemsegAdapter):
    """Cityscapes fine: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/{split}/{city}/*_gtFine_*.png``.

    Attributes:
        label_type: ``"train_ids"`` reads ``*_gtFine_labelTrainIds.png`` (0..18, 255 ignore);
            ``"label_ids"`` reads raw ``*_gtFine_labelIds.png`` through the official id -> train-id table.
    """

    name: str = "cityscapes"
    image_dir: str = "leftImg8bit/{split}"
    label_dir: str = "gtFine/{split}"
    image_suffix: str = "_leftImg8bit.png"
    label_suffix: str | None = None
    recursive: bool = True
    label_type: str = "train_ids"
    default_vocab: ClassVar[str | None] = "cityscapes_19"

    def _build_lut(self) -> np.ndarray:
        if self.label_type not in ("train_ids", "label_ids"):
            raise ValueError(f"cityscapes: label_type must be 'train_ids' or 'label_ids', got {self.label_type!r}")
        if self.label_suffix is None:
            suffixes = {"train_ids": "_gtFine_labelTrainIds.png", "label_ids": "_gtFine_labelIds.png"}
            self.label_suffix = suffixes[self.label_type]
        self._require_classes(19, "cityscapes_19")
        return label_ids.cityscapes_lut(self.label_type == "label_ids", self.vocab.ignore_index, self.vocab.label_dtype)


@dataclass
class VOCAdapter(PairedSemsegAdapter):
    """Pascal VOC 2012: ``JPEGImages/*.jpg`` + ``SegmentationClass/*.png`` listed in ``ImageSets/Segmentation/*.txt``.

    Raw palette index 255 (boundary) -> ignore. For the colour-coded RGB targets (e.g. the shared
    ``voc-samples``: ``image_dir="."``, ``image_suffix="_image.png"``, ``label_suffix="_target.png"``,
    ``list_file=""``, ``label_format="color"``) colours are first decoded to palette indices, the
    boundary colour (224, 224, 192) and off-palette colours becoming ignore.

    Attributes:
        background: ``"ignore"``: 0 -> ignore, 1..20 -> 0..19 (voc_20; ZegCLIP/ZSSeg); ``"keep"``: 0..20 as
            is (voc_21; Seifi et al. PV-21). Also picks the default vocabulary.
        label_format: ``"index"`` for palette/grey PNGs holding indices, ``"color"`` for RGB colour targets.
    """

    name: str = "voc"
    image_dir: str = "JPEGImages"
    label_dir: str = "SegmentationClass"
    list_file: str | None = "ImageSets/Segmentation/{split}.txt"
    background: str = "ignore"
    label_format: str = "index"

    def _default_vocab_name(self) -> str | None:
        return "voc_21" if self.background == "keep" else "voc_20"

    def _build_lut(self) -> np.ndarray:
        if self.background not in ("keep", "ignore"):
            raise ValueError(f"voc: background must be 'keep' or 'ignore', got {self.background!r}")
        if self.label_format not in ("index", "color"):
            raise ValueError(f"voc: label_format must be 'index' or 'color', got {self.label_format!r}")
        keep = self.background == "keep"
        self._require_classes(21 if keep else 20, "voc_21" if keep else "voc_20")
        return label_ids.voc_lut(keep, self.vocab.ignore_index, self.vocab.label_dtype)

    def decode_label(self, data: bytes) -> tuple[np.ndarray, list[str]]:
        """Palette-index or colour label bytes -> ``(HxW train ids, notes)``; a format mismatch raises ValueError."""
        raw = read_label_png(data, self.max_pixels)
        notes: list[str] = []
        if self.label_format == "color":
            if raw.ndim != 3:
                raise ValueError("expected an RGB colour target (label_format=color) but got a single-channel PNG")
            raw, notes = label_ids.voc_color_to_index(raw)
        elif raw.ndim != 2:
            raise ValueError("got an RGB colour target; set label_format=color")
        return label_ids.apply_lut(raw, self._lut, self.vocab.ignore_index), notes


@dataclass
class COCOStuffAdapter(PairedSemsegAdapter):
    """COCO-Stuff 164k: ``images/{split}2017/*.jpg`` + ``annotations/{split}2017/*`` label PNGs.

    Attributes:
        train_ids: False reads raw ``stuffthingmaps`` ``*.png`` (value = COCO id - 1, 255 unlabeled),
            mapped through the vocabulary's ``source_ids`` (COCO ids): coco_stuff_171 gives the
            182 -> 171 table, a subset such as coco_unseen_15 keeps only its classes (rest ignored).
            True reads already-converted ``*_labelTrainIds.png`` (0..170, 255) and needs the
            171-class vocabulary.
    """

    split: str = "val"
    name: str = "coco_stuff"
    image_dir: str = "images/{split}2017"
    label_dir: str = "annotations/{split}2017"
    label_suffix: str | None = None
    train_ids: bool = False
    default_vocab: ClassVar[str | None] = "coco_stuff_171"

    def _build_lut(self) -> np.ndarray:
        if self.label_suffix is None:
            self.label_suffix = "_labelTrainIds.png" if self.train_ids else ".png"
        if self.train_ids:
            self._require_classes(171, "coco_stuff_171")
            return label_ids.shifted_lut(0, 171, self.vocab.ignore_index, self.vocab.label_dtype)
        if self.vocab.source_ids is None:
            raise ValueError(f"coco_stuff: vocabulary '{self.vocab.name}' has no source_ids (COCO ids); "
                             "use vocab=coco_stuff_171 or a subset of it")
        return label_ids.lut_from_source_ids(self.vocab.source_ids, -1, self.vocab.ignore_index, self.vocab.label_dtype)
