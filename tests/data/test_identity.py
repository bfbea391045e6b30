"""Input identities: built from listings (size, mtime or ETag) and small annotation files, never image bytes."""

from __future__ import annotations

import json

from object_store import moto_s3

from pipeline.data.folder import FolderAdapter
from pipeline.data.registry import build_adapter
from pipeline.data.wds import ShardsAdapter


def test_a_symlinked_image_changes_with_its_target(tmp_path):
    target, folder = tmp_path / "real.png", tmp_path / "pool"
    folder.mkdir()
    target.write_bytes(b"one")
    (folder / "a.png").symlink_to(target)
    before = FolderAdapter(str(folder), vocab="toy").input_identity()
    target.write_bytes(b"other bytes")
    after = FolderAdapter(str(folder), vocab="toy").input_identity()
    assert list(before.items) == list(after.items) and before.digest != after.digest


def test_object_store_versions_are_etags(monkeypatch):
    with moto_s3(monkeypatch) as fs:
        fs.pipe_file("segetl-test/pool/a.png", b"one")
        fs.pipe_file("segetl-test/pool/sub/b.png", b"two")
        adapter = FolderAdapter("s3://segetl-test/pool", vocab="toy")
        refs = adapter.list_items()
        assert [r.source for r in refs] == ["s3://segetl-test/pool/a.png", "s3://segetl-test/pool/sub/b.png"]
        assert all(":etag=" in r.version for r in refs)
        before = adapter.input_identity()
        fs.pipe_file("segetl-test/pool/a.png", b"uno")  # same size, new content: a new ETag
        after = adapter.input_identity()
        changed = [name for name in before.items if before.items[name] != after.items[name]]
        assert changed == [refs[0].key]


def test_coco_identity_follows_each_images_own_annotations(tmp_path):
    annotations = [{"id": i, "image_id": i, "category_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]], "area": 1}
                   for i in (1, 2)]
    body = {"images": [{"id": i, "file_name": f"im{i}.png", "height": 2, "width": 2} for i in (1, 2)],
            "annotations": annotations, "categories": [{"id": 1, "name": "sky"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(body))
    before = build_adapter({"kind": "coco", "annotation_file": str(path), "vocab": "toy"}).input_identity()
    annotations[1]["segmentation"] = [[0, 0, 2, 0, 2, 2]]
    path.write_text(json.dumps(body))
    after = build_adapter({"kind": "coco", "annotation_file": str(path), "vocab": "toy"}).input_identity()
    assert [k for k in before.items if before.items[k] != after.items[k]] == ["coco_val_im2"]
    assert before.extra == after.extra  # the category table is unchanged


def test_shards_identity_uses_the_upstream_manifest_checksums(tmp_path):
    (tmp_path / "000000.tar").write_bytes(b"\0" * 1024)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"name": "000000.tar", "sha256": "ab" * 32}]}))
    identity = ShardsAdapter(str(tmp_path), vocab="toy").input_identity()
    assert identity.items == {str(tmp_path / "000000.tar"): "sha256:" + "ab" * 32}
    (tmp_path / "manifest.json").unlink()  # not a segetl output: the tar's listing version instead
    assert ShardsAdapter(str(tmp_path), vocab="toy").input_identity().items[str(tmp_path / "000000.tar")].startswith(
        "1024:mtime=")
