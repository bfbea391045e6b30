"""Tests for pipeline/data/labels.py: each dataset's raw value -> train id convention (methods-spec §5.2)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import labels
from pipeline.data.vocab import load_vocab

IGNORE = 255


def test_ade20k_shifts_by_one_and_ignores_other() -> None:
    lut = labels.ade20k_lut(IGNORE, np.uint8)
    raw = np.array([[0, 1, 3], [150, 151, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(labels.apply_lut(raw, lut, IGNORE), [[255, 0, 2], [149, 255, 255]])


def test_camvid_void_is_ignored() -> None:
    lut = labels.camvid_lut(IGNORE, np.uint8)
    raw = np.array([[0, 10, 11, 12]], dtype=np.uint8)
    np.testing.assert_array_equal(labels.apply_lut(raw, lut, IGNORE), [[0, 10, 255, 255]])


@pytest.mark.parametrize(("keep", "expected"), [(True, [0, 1, 20, 255]), (False, [255, 0, 19, 255])])
def test_voc_background_keep_or_ignore(keep: bool, expected: list[int]) -> None:
    lut = labels.voc_lut(keep, IGNORE, np.uint8)
    raw = np.array([[0, 1, 20, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(labels.apply_lut(raw, lut, IGNORE), [expected])


def test_cityscapes_official_table() -> None:
    lut = labels.cityscapes_lut(True, IGNORE, np.uint8)
    raw = np.array([[0, 7, 8, 11, 26, 33, 34, 6, 9, 29]], dtype=np.uint8)
    np.testing.assert_array_equal(labels.apply_lut(raw, lut, IGNORE), [[255, 0, 1, 2, 13, 18, 255, 255, 255, 255]])


@pytest.mark.parametrize(("vocab_name", "lut_fn"), [
    ("ade20k_150", lambda: labels.ade20k_lut(IGNORE, np.uint8)),
    ("camvid_11", lambda: labels.camvid_lut(IGNORE, np.uint8)),
    ("voc_21", lambda: labels.voc_lut(True, IGNORE, np.uint8)),
    ("voc_20", lambda: labels.voc_lut(False, IGNORE, np.uint8)),
    ("cityscapes_19", lambda: labels.cityscapes_lut(True, IGNORE, np.uint8)),
])
def test_conventions_agree_with_vocabulary_source_ids(vocab_name: str, lut_fn: object) -> None:
    vocab = load_vocab(vocab_name)
    from_vocab = labels.lut_from_source_ids(vocab.source_ids, 0, IGNORE, np.uint8)
    np.testing.assert_array_equal(lut_fn(), from_vocab)


def test_coco_stuff_182_to_171_table() -> None:
    vocab = load_vocab("coco_stuff_171")
    lut = labels.lut_from_source_ids(vocab.source_ids, -1, IGNORE, np.uint8)
    # stuffthingmap value = COCO id - 1: person (id 1) -> 0, stop sign (id 13) -> 11, unused id 12 -> ignore.
    assert lut[0] == 0 and lut[12] == 11 and lut[11] == IGNORE
    unused_coco_ids = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]
    assert all(lut[coco_id - 1] == IGNORE for coco_id in unused_coco_ids)
    assert sorted(lut[lut != IGNORE].tolist()) == list(range(171))
    assert lut[181] == 170 and lut[255] == IGNORE  # COCO id 182 is the last stuff class; 255 unlabeled


def test_apply_lut_out_of_range_values_are_ignored_for_wide_dtypes() -> None:
    lut = labels.camvid_lut(IGNORE, np.uint8)
    raw = np.array([[-1, 3, 300, 65535]], dtype=np.int32)
    np.testing.assert_array_equal(labels.apply_lut(raw, lut, IGNORE), [[255, 3, 255, 255]])


def test_identity_train_ids_keeps_range_only() -> None:
    raw = np.array([[0, 170, 171, 65535]], dtype=np.uint16)
    out = labels.identity_train_ids(raw, 171, 255, np.uint8)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 170, 255, 255]])


def test_voc_palette_known_entries() -> None:
    palette = labels.voc_palette()
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]  # aeroplane
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # boundary


def test_voc_color_decoding() -> None:
    rgb = np.array([[[0, 0, 0], [192, 128, 128], [224, 224, 192], [1, 2, 3]]], dtype=np.uint8)
    indices, notes = labels.voc_color_to_index(rgb)
    np.testing.assert_array_equal(indices, [[0, 15, 255, 255]])
    assert notes == ["1 pixels with colours outside the VOC palette set to ignore"]
