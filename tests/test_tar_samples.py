"""Tar member validation and checksum verification, shared by every reader: `StageOutput` readers, the torch
dataset, webdataset pipelines and the shards input adapter refuse unsafe shards with the shard and member named."""

from __future__ import annotations

import numpy as np
import pytest
from label_fixtures import label_sample, publish, raw_tar, replace_shard

from pipeline.data.vocab import load_vocab
from pipeline.data.wds import ShardsAdapter
from pipeline.shards import open_stage
from pipeline.tar_samples import UnsafeShardError, iter_tar_samples, verify_shard

VOCAB = load_vocab("toy")
CRAFTED = {
    "traversal": ([("../evil.label.png", b"x", "file")], r"climbs out of the shard"),
    "nested traversal": ([("a/../../evil.jpg", b"x", "file")], r"climbs out"),
    "absolute": ([("/etc/evil.jpg", b"x", "file")], r"absolute path"),
    "windows absolute": ([("C:\\evil.jpg", b"x", "file")], r"absolute path"),
    "symlink": ([("evil.jpg", b"/etc/passwd", "symlink")], r"symbolic link"),
    "hardlink": ([("good.jpg", b"x", "file"), ("evil.jpg", b"good.jpg", "hardlink")], r"hard link"),
    "split sample": ([("a.jpg", b"1", "file"), ("b.jpg", b"2", "file"), ("a.json", b"{}", "file")],
                     r"repeats sample key 'a'"),
    "repeated member": ([("a.jpg", b"1", "file"), ("a.jpg", b"2", "file")], r"appears twice"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_tars_are_refused_naming_shard_and_member(tmp_path, case):
    members, message = CRAFTED[case]
    url = tmp_path / "000000.tar"
    url.write_bytes(raw_tar(members))
    with pytest.raises(UnsafeShardError, match=message) as caught:
        list(iter_tar_samples(str(url)))
    assert str(url) in str(caught.value) and repr(members[-1][0]) in str(caught.value)


def test_oversized_members_are_refused(tmp_path):
    url = tmp_path / "000000.tar"
    url.write_bytes(raw_tar([("a.jpg", b"x" * 2048, "file")]))
    with pytest.raises(UnsafeShardError, match="2048 bytes, above max_member_bytes=1024"):
        list(iter_tar_samples(str(url), max_member_bytes=1024))
    assert [s["jpg"] for s in iter_tar_samples(str(url), max_member_bytes=4096)] == [b"x" * 2048]


def _output_with_crafted_shard(tmp_path, members):
    label = np.zeros((4, 4), dtype=np.uint8)
    node = publish(str(tmp_path / "out"), "pl", VOCAB, [[label_sample("ok", label, VOCAB)]] * 2)
    replace_shard(node, 1, raw_tar(members))
    return open_stage(node)


def test_every_reader_refuses_an_unsafe_shard(tmp_path):
    output = _output_with_crafted_shard(tmp_path, [("x/../../evil.label.png", b"x", "file")])
    readers = {
        "samples": lambda: list(output.samples()),
        "webdataset": lambda: list(output.webdataset(split_by_node=False, split_by_worker=False)),
        "torch": lambda: list(output.torch_dataset()),
        "shards adapter": lambda: ShardsAdapter(output.path, vocab=VOCAB).list_items(),
    }
    for name, read in readers.items():
        with pytest.raises(UnsafeShardError, match="climbs out"):
            read()
        assert not (tmp_path / "evil.label.png").exists(), name


def test_verify_detects_a_changed_shard_before_any_sample(tmp_path):
    label = np.zeros((4, 4), dtype=np.uint8)
    output = open_stage(publish(str(tmp_path), "pl", VOCAB, [[label_sample("a", label, VOCAB)]]))
    assert [s["__key__"] for s in output.samples(verify=True)] == ["a"]
    url = output.shard_urls()[0]
    verify_shard(url)  # recorded sha256 from the manifest
    data = bytearray(open(url, "rb").read())
    data[600] ^= 0xFF  # inside the first member's data: the tar still parses
    open(url, "wb").write(bytes(data))
    assert [s["__key__"] for s in output.samples()] == ["a"]  # without verify the change goes unnoticed
    for read in (lambda: next(output.samples(verify=True)),
                 lambda: next(iter(output.torch_dataset(verify=True))),
                 lambda: next(iter(output.webdataset(split_by_node=False, verify=True))),
                 lambda: ShardsAdapter(output.path, vocab=VOCAB, verify=True).list_items()):
        with pytest.raises(UnsafeShardError, match="differs from the recorded"):
            read()
    assert ShardsAdapter(output.path, vocab=VOCAB).list_items()[0].key == "a"
