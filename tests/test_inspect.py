"""`python -m pipeline.inspect`: failed samples grouped by reason with counts, class histograms equal to the label
maps' own counts, `--json`, and `--diff` between two fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from label_fixtures import label_sample, publish

from pipeline.data.vocab import load_vocab
from pipeline.export.__main__ import main as export
from pipeline.inspect import failure_reason, main
from pipeline.sample_files import decode_label_png, encode_label_png
from pipeline.shards import SampleOutput, open_stage

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
VOCAB = load_vocab("toy")


def stage_with_failures(tmp_path: Path, split: str = "train") -> Path:
    """Run the export stage on a source where 6 of 8 samples cannot be exported, for three reasons."""
    zeros = np.zeros((4, 4), np.uint8)
    good = [label_sample(f"good{i}", zeros, VOCAB) for i in range(2)]
    bad_ids = [label_sample(f"ids{i}", np.full((4, 4), 100 + i, np.uint8), VOCAB) for i in range(3)]
    no_image = [SampleOutput(f"noimg{i}", {"label.png": encode_label_png(zeros),
                                          "json": json.dumps({"source": f"toyworld://train/{i}"}).encode()})
                for i in range(2)]
    no_label = [SampleOutput("nolabel", {"json": b"{}"})]
    source = publish(str(tmp_path / "src"), "pl", VOCAB, [good + bad_ids, no_image + no_label])
    out = tmp_path / f"out_{split}"
    assert export([source, "--format", "mmseg", "--out", str(out), "--split", split, "--executor", "local",
                   "--max-failure-ratio", "1"]) == 0
    return out / ".segetl" / "export"


def test_inspect_groups_failed_samples_by_reason_with_counts(tmp_path, capsys):
    node = stage_with_failures(tmp_path)
    capsys.readouterr()
    assert main([str(node), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["node"], summary["kind"], summary["schema"]) == ("export", "export", "export/1")
    assert summary["counts"] == {"samples": 2, "failed": 6, "shards": 2, "bytes": summary["counts"]["bytes"]}
    groups = [(g["count"], g["reason"]) for g in summary["failures"]]
    assert groups == [
        (3, "ValueError: label.png holds ids [N] outside the vocabulary's N classes"),
        (2, "ValueError: no image: the shard stores none and json.source <path> is not a readable JPEG or PNG; re-run "
            "the source stage with image_format=jpg or export to coco (which can reference sources)"),
        (1, "ValueError: no label.png member"),
    ]
    assert summary["failures"][0]["example"]["key"] == "ids0"
    assert main([str(node)]) == 0
    table = capsys.readouterr().out
    assert "failed samples by reason (6):" in table
    for count, reason in groups:
        assert f"{count:>7}  {reason}" in table


def test_failure_reasons_mask_paths_and_numbers():
    assert failure_reason("file not found: /data/a/b.jpg") == failure_reason("file not found: s3://x/c.jpg") == \
        "file not found: <path>"
    assert failure_reason("image too large: 9000x9000 > max_pixels=1000") == "image too large: NxN > max_pixels=N"


def test_class_histogram_counts_the_label_maps(demo_pseudolabels, capsys):
    assert main([demo_pseudolabels.path, "--json", "--max-samples", "4"]) == 0
    histogram = json.loads(capsys.readouterr().out)["histogram"]
    expected, masks = np.zeros(256, np.int64), {}
    for sample in list(demo_pseudolabels.samples())[:4]:
        expected += np.bincount(decode_label_png(sample["label.png"]).ravel(), minlength=256)
        for entry in json.loads(sample["masks.json"]):
            name = VOCAB.names[entry["category_id"]]
            masks[name] = masks.get(name, 0) + 1
    wanted = {VOCAB.names[i]: int(n) for i, n in enumerate(expected[:12]) if n}
    if expected[255]:
        wanted["ignore"] = int(expected[255])
    assert histogram["samples_read"] == 4
    assert histogram["pixels"]["label.png"] == wanted and histogram["masks"] == masks


def test_diff_shows_what_differs_between_two_fingerprints(tmp_path, capsys):
    train, val = stage_with_failures(tmp_path, "train"), stage_with_failures(tmp_path, "val")
    assert open_stage(str(train)).fingerprint != open_stage(str(val)).fingerprint
    capsys.readouterr()
    assert main([str(train), "--diff", str(val), "--json"]) == 0
    rows = {r["key"]: (r["this"], r["other"]) for r in json.loads(capsys.readouterr().out)}
    assert rows == {"config.split": ("train", "val"),
                    "config.out": (str(tmp_path / "out_train"), str(tmp_path / "out_val"))}
    assert main([str(train), "--diff", str(train)]) == 0
    assert "no differences" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
