"""Crafted malicious source shards are refused by the exporter with the shard and member named, and nothing is
written outside the export folder; keys that sanitise onto each other are refused too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from label_fixtures import label_sample, publish, raw_tar, replace_shard

from pipeline.data.vocab import load_vocab
from pipeline.export.__main__ import main
from pipeline.export.writer import ExportTarget
from pipeline.sample_files import encode_image, encode_label_png

VOCAB = load_vocab("toy")
LABEL = encode_label_png(np.zeros((4, 4), dtype=np.uint8))
IMAGE = encode_image(np.zeros((4, 4, 3), dtype=np.uint8), "png")
ESCAPE = "../../../escaped"
CASES = {  # members, what the error says, what it names
    "traversal": ([(f"{ESCAPE}.label.png", LABEL, "file"), (f"{ESCAPE}.png", IMAGE, "file")], "climbs out",
                  f"'{ESCAPE}.label.png'"),
    "absolute": ([("/tmp/escaped.label.png", LABEL, "file"), ("/tmp/escaped.png", IMAGE, "file")], "absolute",
                 "'/tmp/escaped.label.png'"),
    "symlink": ([("escaped.label.png", b"/etc/passwd", "symlink"), ("escaped.png", IMAGE, "file")],
                "symbolic link", "'escaped.label.png'"),
    "hardlink": ([("a.label.png", LABEL, "file"), ("escaped.label.png", b"a.label.png", "hardlink")], "hard link",
                 "'escaped.label.png'"),
    "colliding keys": ([("a/b.label.png", LABEL, "file"), ("a/b.png", IMAGE, "file"),
                        ("a_b.label.png", LABEL, "file"), ("a_b.png", IMAGE, "file")], "both become 'a_b'",
                       "'a/b' and 'a_b'"),
}


def files_outside(root: Path, out: Path) -> set[Path]:
    """Everything under `root` that is neither inside `out` nor `out` or one of its folders."""
    return {p for p in root.rglob("*") if out not in p.parents and p not in (out, *out.parents)}


@pytest.mark.parametrize("fmt", ["mmseg", "coco"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_malicious_shards_are_refused_and_nothing_leaves_the_export_folder(tmp_path, capsys, case, fmt):
    members, message, named = CASES[case]
    work = tmp_path / "work"
    node = publish(str(work / "src"), "pl", VOCAB, [[label_sample("good", np.zeros((4, 4), np.uint8), VOCAB)]] * 2)
    replace_shard(node, 1, raw_tar(members))
    out = work / "deep" / "er" / "out"
    before = files_outside(tmp_path, out)
    assert main([node, "--format", fmt, "--out", str(out), "--executor", "local"]) == 2
    error = capsys.readouterr().err
    assert message in error and "000001.tar" in error and named in error
    assert files_outside(tmp_path, out) - before == set()
    assert not list(Path("/tmp").glob("escaped*"))
    assert not (out / "segetl_export_train.json").exists()  # not published


def test_keys_colliding_across_shards_fail_the_export_before_it_is_published(tmp_path, capsys):
    zeros = np.zeros((4, 4), np.uint8)
    node = publish(str(tmp_path / "src"), "pl", VOCAB, [[label_sample("a_b", zeros, VOCAB)],
                                                       [label_sample("other", zeros, VOCAB)]])
    replace_shard(node, 1, raw_tar([("a/b.label.png", LABEL, "file"), ("a/b.png", IMAGE, "file"),
                                    ("a/b.json", json.dumps({"source": "x"}).encode(), "file")]))
    out = tmp_path / "out"
    assert main([node, "--format", "mmseg", "--out", str(out), "--executor", "local"]) == 2
    assert "both hold key 'a_b'" in capsys.readouterr().err
    assert not (out / "segetl_export_train.json").exists() and not (out / "mmseg_train.py").exists()


def test_sanitised_keys_are_used_as_file_names(tmp_path):
    node = publish(str(tmp_path / "src"), "pl", VOCAB, [[label_sample("good", np.zeros((4, 4), np.uint8), VOCAB)]])
    replace_shard(node, 0, raw_tar([("dir/x-y.label.png", LABEL, "file"), ("dir/x-y.png", IMAGE, "file")]))
    out = tmp_path / "out"
    assert main([node, "--format", "mmseg", "--out", str(out), "--executor", "local"]) == 0
    assert sorted(p.name for p in (out / "ann_dir" / "train").iterdir()) == ["dir_x-y.png"]


@pytest.mark.parametrize("relative", ["../x", "/abs", "a/../../x", "a//b", ".", "a/./b", "a\\b", ""])
def test_export_paths_cannot_leave_the_folder(tmp_path, relative):
    with pytest.raises(ValueError, match="not a plain relative path"):
        ExportTarget(str(tmp_path)).path(relative)


def test_an_occupied_folder_is_not_exported_into(tmp_path, capsys):
    node = publish(str(tmp_path / "src"), "pl", VOCAB, [[label_sample("good", np.zeros((4, 4), np.uint8), VOCAB)]])
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert main([node, "--format", "coco", "--out", str(out), "--executor", "local"]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["precious.txt"]
