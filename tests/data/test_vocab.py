"""Tests for the vocabulary files in conf/vocabularies and their loader (pipeline/data/vocab.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.vocab import Vocabulary, list_vocabs, load_vocab, vocab_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
COCO_UNSEEN_IDS = (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160)
# IFSeg run_scripts/IFSeg/coco_unseen.sh order, official COCO-Stuff spellings.
IFSEG_UNSEEN_ORDER = (
    "frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow", "road",
    "wall-concrete", "tree", "grass", "river", "clouds", "playingfield",
)  # fmt: skip


def _write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("coco_stuff_171", 171), ("coco_stuff_27", 27), ("coco_unseen_15", 15), ("ade20k_150", 150),
        ("voc_20", 20), ("voc_21", 21), ("pascal_context_59", 59), ("pascal_context_60", 60),
        ("cityscapes_19", 19), ("camvid_11", 11), ("toy", 12),
    ],
)  # fmt: skip
def test_class_counts_and_uint8_labels(name: str, count: int) -> None:
    vocab = load_vocab(name)
    assert vocab.name == name
    assert vocab.num_classes == count
    assert vocab.label_dtype is np.uint8 and vocab.ignore_index == 255


def test_list_vocabs_names_every_shipped_file() -> None:
    expected = {"coco_stuff_171", "coco_stuff_27", "coco_unseen_15", "ade20k_150", "voc_20", "voc_21"}
    expected |= {"pascal_context_59", "pascal_context_60", "cityscapes_19", "camvid_11", "toy"}
    assert expected <= set(list_vocabs())
    assert vocab_dir() == REPO_ROOT / "conf" / "vocabularies"


def test_coco_unseen_split_ids_and_names() -> None:
    vocab = load_vocab("coco_stuff_171")
    assert vocab.unseen_ids == COCO_UNSEEN_IDS
    assert {vocab.names[i] for i in COCO_UNSEEN_IDS} == set(IFSEG_UNSEEN_ORDER)
    assert vocab.names[19] == "cow" and vocab.names[160] == "wall-concrete" and vocab.names[133] == "playingfield"
    assert len(vocab.seen_ids) == 156 and set(vocab.seen_ids).isdisjoint(COCO_UNSEEN_IDS)
    # ZSSeg novel_clsID are raw stuffthingmap values = COCO category id - 1.
    novel_raw = sorted(vocab.source_ids[i] - 1 for i in COCO_UNSEEN_IDS)
    assert novel_raw == [20, 24, 32, 33, 40, 56, 86, 99, 105, 123, 144, 147, 148, 168, 171]


def test_coco_name_variants() -> None:
    vocab = load_vocab("coco_stuff_171")
    assert vocab.names[160] == "wall-concrete"
    assert vocab.prompt_names("ifseg")[160] == "concrete wall"
    assert vocab.prompt_names("ifseg")[161] == "other wall" and vocab.prompt_names("maskclip")[161] == "wall"
    assert vocab.prompt_names("ifseg")[91] == "ceiling tile" and vocab.prompt_names("maskclip")[91] == "tile ceiling"
    assert vocab.prompt_names("ifseg")[0] == "person"  # classes without a variant fall back to the official name
    assert vocab.prompt_names("no_such_variant") == vocab.names == vocab.prompt_names()
    assert vocab.source_ids[:13] == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14) and vocab.source_ids[-1] == 182


def test_coco_coarse_groups_cover_all_classes() -> None:
    vocab = load_vocab("coco_stuff_171")
    groups = vocab.coarse_groups()
    assert len(groups) == 27
    assert sorted(i for ids in groups.values() for i in ids) == list(range(171))
    assert set(groups) == set(load_vocab("coco_stuff_27").names)
    assert groups["person"] == (0,) and groups["sky"] == (94, 145)
    assert [vocab.names[i] for i in groups["window"]] == ["window-blind", "window-other"]
    assert groups["water"] == (108, 136, 143, 166, 167)
    assert list(groups)[:3] == ["person", "vehicle", "outdoor"]  # order of first appearance


def test_coco_27_follows_stego_order() -> None:
    vocab = load_vocab("coco_stuff_27")
    assert vocab.names[:3] == ("electronic", "appliance", "food-things")
    assert vocab.names[11] == "vehicle" and vocab.names[12] == "ceiling" and vocab.names[26] == "water"
    assert vocab.prompt_names("ifseg")[14] == "food (stuff)"


def test_unseen_15_is_the_subset_of_171_in_ifseg_order() -> None:
    unseen15 = load_vocab("coco_unseen_15")
    subset = load_vocab("coco_stuff_171").subset(list(IFSEG_UNSEEN_ORDER), name="coco_unseen_15")
    assert subset == unseen15 and subset.digest() == unseen15.digest()
    assert unseen15.prompt_names("ifseg")[9] == "concrete wall"
    assert unseen15.seen_ids == () and unseen15.unseen_ids == tuple(range(15))


def test_subset_by_ids_remaps_unseen_and_keeps_metadata() -> None:
    vocab = load_vocab("coco_stuff_171")
    sub = vocab.subset([160, "person", 19], name="tiny")
    assert sub.names == ("wall-concrete", "person", "cow")
    assert sub.unseen_ids == (0, 2) and sub.seen_ids == (1,)
    assert sub.source_ids == (172, 1, 21) and sub.coarse == ("wall", "person", "animal")
    assert sub.prompt_names("ifseg") == ("concrete wall", "person", "cow")
    assert vocab.subset(["person", "cow"], name="no_variants").variants == {}
    with pytest.raises(ValueError, match="twice"):
        vocab.subset(["cow", 19], name="dup")
    with pytest.raises(ValueError, match="unicorn"):
        vocab.subset(["unicorn"], name="bad")
    with pytest.raises(ValueError, match="out of range"):
        vocab.subset([171], name="bad")


def test_ade_voc_context_city_camvid_conventions() -> None:
    ade = load_vocab("ade20k_150")
    assert ade.names[0] == "wall" and ade.names[2] == "sky" and ade.names[149] == "flag"
    assert ade.source_ids == tuple(range(1, 151))
    voc20, voc21 = load_vocab("voc_20"), load_vocab("voc_21")
    assert voc20.unseen_ids == (15, 16, 17, 18, 19)
    assert voc20.prompt_names("maskclip")[19] == "tv monitor" and voc20.names[19] == "tvmonitor"
    assert voc21.names[0] == "background" and voc21.names[1:] == voc20.names and voc21.unseen_ids == ()
    assert voc21.source_ids == tuple(range(21)) and voc20.source_ids == tuple(range(1, 21))
    pc59, pc60 = load_vocab("pascal_context_59"), load_vocab("pascal_context_60")
    assert pc60.names[0] == "background" and 0 in pc60.seen_ids and len(pc60.seen_ids) == 50
    assert {pc59.names[i] for i in pc59.unseen_ids} == {
        "cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tvmonitor", "keyboard", "aeroplane",
    }  # fmt: skip
    assert pc59.prompt_names("zsseg")[49] == "diningtable" and pc59.names[49] == "table"
    city = load_vocab("cityscapes_19")
    assert city.names[0] == "road" and city.names[18] == "bicycle" and city.source_ids[16] == 31
    camvid = load_vocab("camvid_11")
    assert camvid.names[6] == "sign symbol" and camvid.prompt_names("segnet")[6] == "SignSymbol"
    assert camvid.source_ids == tuple(range(11))


def test_toy_vocabulary() -> None:
    toy = load_vocab("toy")
    assert toy.names == (
        "sky", "grass", "road", "water", "building", "tree", "sand", "car", "person", "dog", "boat", "ball",
    )  # fmt: skip
    assert toy.unseen_ids == (5, 9, 10)
    assert toy.coarse_groups() == {
        "sky": (0,), "vegetation": (1, 5), "ground": (2, 6), "water": (3,), "structure": (4,),
        "vehicle": (7, 10), "animal": (8, 9), "object": (11,),
    }  # fmt: skip
    with pytest.raises(ValueError, match="no 'coarse'"):
        load_vocab("ade20k_150").coarse_groups()


@pytest.mark.parametrize("name", ["coco_stuff_171", "coco_unseen_15", "pascal_context_60", "camvid_11", "toy"])
def test_round_trip_through_json(name: str) -> None:
    vocab = load_vocab(name)
    restored = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert restored == vocab
    assert restored.digest() == vocab.digest()
    assert hash(restored) == hash(vocab)


def test_digest_is_sha256_of_canonical_json() -> None:
    vocab = Vocabulary(
        name="pair", names=("cat", "wall-other"), variants={"ifseg": ("cat", "other wall")},
        unseen_ids=(0,), coarse=None, source_ids=(17, 173),
    )  # fmt: skip
    canonical = (
        '{"classes":[{"name":"cat","source_id":17},'
        '{"name":"wall-other","source_id":173,"variants":{"ifseg":"other wall"}}],'
        '"ignore_index":255,"name":"pair","unseen":["cat"]}'
    )
    assert vocab.digest() == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    all_seen = Vocabulary.from_dict({**vocab.to_dict(), "unseen": []})
    assert all_seen.digest() != vocab.digest()


def test_digest_is_stable_across_processes() -> None:
    code = "from pipeline.data.vocab import load_vocab; print(load_vocab('coco_stuff_171').digest())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == load_vocab("coco_stuff_171").digest()


def test_unknown_vocab_lists_available_names() -> None:
    with pytest.raises(ValueError, match="unknown vocabulary 'coco_stuff_999'.*coco_stuff_171"):
        load_vocab("coco_stuff_999")
    with pytest.raises(ValueError, match="does not exist"):
        load_vocab("/nonexistent/dir/mine.yaml")


def test_load_from_path_in_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_yaml(
        tmp_path / "mine.yaml",
        "name: mine\nclasses:\n  - {name: cat, coarse: animal}\n  - {name: dog, coarse: animal}\nunseen: [dog]\n",
    )
    monkeypatch.chdir(tmp_path)
    mine = load_vocab(str(path))
    assert mine.names == ("cat", "dog") and mine.unseen_ids == (1,) and mine.ignore_index == 255
    assert load_vocab("toy").num_classes == 12  # names resolve relative to the repo, not the cwd


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("classes:\n  - {name: cat}\n  - {name: cat}\n", "duplicate class names"),
        ("classes:\n  - {name: cat}\nunseen: [dog]\n", "not official class names"),
        ("classes:\n  - {name: cat, coarse: a}\n  - {name: dog}\n", "'coarse' must be given for all"),
        ("classes:\n  - {name: cat, source_id: 1}\n  - {name: dog}\n", "'source_id' must be given for all"),
        ("classes:\n  - {name: no}\n", "non-empty string"),  # YAML 1.1 reads `no` as False
        ("classes:\n  - {name: a, variants: {x: b}}\n  - {name: b}\n", "variant 'x' repeats"),
        ("classes:\n  - {name: cat}\nignore_index: 0\n", "ignore_index must be 255"),
    ],
)
def test_invalid_files_are_rejected(tmp_path: Path, body: str, message: str) -> None:
    path = _write_yaml(tmp_path / "bad.yaml", "name: bad\n" + body)
    with pytest.raises(ValueError, match=message):
        load_vocab(path)


def test_name_must_match_file_stem(tmp_path: Path) -> None:
    path = _write_yaml(tmp_path / "stem.yaml", "name: other\nclasses:\n  - {name: cat}\n")
    with pytest.raises(ValueError, match="must equal the stem 'stem'"):
        load_vocab(path)


def test_more_than_255_classes_use_uint16_and_65535() -> None:
    classes = [{"name": f"class {i}"} for i in range(300)]
    big = Vocabulary.from_dict({"name": "big", "classes": classes})
    assert big.label_dtype is np.uint16 and big.ignore_index == 65535
    with pytest.raises(ValueError, match="ignore_index must be 65535"):
        Vocabulary.from_dict({"name": "big", "classes": classes, "ignore_index": 255})
