"""The sample decoder: label maps come back as integer arrays of their stored dtype through plain webdataset and
through our readers (the README snippet), images as RGB uint8, masks.json parsed; raw bytes stay available."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds
from label_fixtures import big_vocab, label_sample, publish

from pipeline.data.vocab import load_vocab
from pipeline.sample_files import decode_label_png, encode_label_png, rle_to_mask, wds_decoder
from pipeline.shards import open_stage

CASES = {
    "uint8": (load_vocab("toy"), np.array([[0, 7, 11], [254, 255, 3]], dtype=np.uint8)),
    "uint16": (big_vocab(), np.array([[0, 300, 846], [65535, 899, 1]], dtype=np.uint16)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_label_maps_round_trip_exactly_through_plain_webdataset(tmp_path, case):
    vocab, label = CASES[case]
    label = np.tile(label, (4, 4))  # 8 x 12
    samples = [label_sample("a", label, vocab), label_sample("b", label[::-1], vocab)]
    node = publish(str(tmp_path), "pl", vocab, [samples])
    urls = open_stage(node).shard_urls()
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode(wds_decoder))
    assert [s["__key__"] for s in samples] == ["a", "b"]
    for sample, expected in zip(samples, (label, label[::-1])):
        assert sample["label.png"].dtype == label.dtype and sample["gt.png"].dtype == label.dtype
        np.testing.assert_array_equal(sample["label.png"], expected)
        np.testing.assert_array_equal(sample["gt.png"], expected)
        assert sample["jpg"].shape == (*label.shape, 3) and sample["jpg"].dtype == np.uint8
        assert sample["json"]["schema"] == "pseudolabel/1"
        for entry in sample["masks.json"]:
            np.testing.assert_array_equal(rle_to_mask(entry["segmentation"]), expected == entry["category_id"])


def test_pil_decoding_is_the_bug_the_decoder_fixes(tmp_path):
    vocab, label = CASES["uint16"]
    urls = open_stage(publish(str(tmp_path), "pl", vocab, [[label_sample("a", label, vocab)]])).shard_urls()
    pil = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("l")))["label.png"]
    assert pil.dtype != np.uint16  # floats in [0, 1]: ids are lost without our decoder
    ours = next(iter(wds.WebDataset(urls, shardshuffle=False).decode(wds_decoder)))["label.png"]
    assert ours.tolist() == label.tolist() == [[0, 300, 846], [65535, 899, 1]]


def test_our_readers_decode_by_default_and_keep_raw_bytes_on_request(tmp_path):
    vocab, label = CASES["uint16"]
    output = open_stage(publish(str(tmp_path), "pl", vocab, [[label_sample("a", label, vocab)]]))
    decoded = [next(iter(output.webdataset(split_by_node=False))), next(iter(output.torch_dataset()))]
    for sample in decoded:
        np.testing.assert_array_equal(sample["label.png"], label)
        assert isinstance(sample["masks.json"], list) and sample["json"]["key"] == "a"
    raw = next(iter(output.torch_dataset(decode=False)))
    assert raw["label.png"] == encode_label_png(label)
    assert json.loads(raw["json"])["key"] == "a"
    np.testing.assert_array_equal(decode_label_png(next(output.samples())["label.png"]), label)


def test_unknown_members_are_left_to_webdataset_handlers_and_npy_decodes():
    from pipeline.sample_files import encode_npy

    assert wds_decoder(".txt", b"hello") is None
    grid = np.arange(6, dtype=np.uint16).reshape(2, 3)
    np.testing.assert_array_equal(wds_decoder(".grid.npy", encode_npy(grid)), grid)
