"""Tests for the input adapters on the real shared samples (skipped when absent) and on tiny synthetic layouts."""

from __future__ import annotations

import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import read_bytes, read_label_png
from pipeline.data.registry import ADAPTERS, build_adapter

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def photo(height: int = 12, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- real samples


def test_camvid_val_ids_and_scene_layout(shared_data: Path) -> None:
    adapter = build_adapter({"kind": "camvid", "root": str(shared_data / "camvid"), "split": "val"})
    refs = adapter.list_items()
    assert len(refs) == 101 and refs[0].key == "camvid_val_0016E5_07959"
    assert [ref.key for ref in refs] == sorted(ref.key for ref in refs)
    listed = build_adapter({"kind": "camvid", "root": str(shared_data / "camvid"), "split": "val",
                            "list_file": "{split}.txt"}).list_items()
    assert listed == refs
    sky_rows, road_bottom = [], []
    for ref in refs[::5]:
        record = adapter.load(ref)
        assert record.ok and record.image.shape == (360, 480, 3) and record.label.dtype == np.uint8
        assert set(np.unique(record.label).tolist()) <= set(range(11)) | {255}
        road_bottom.append(np.bincount(record.label[-60:].ravel(), minlength=256).argmax() == 3)
        sky_rows.extend(np.nonzero(record.label == 0)[0].tolist())
    assert np.mean(road_bottom) >= 0.9  # "Road" (3) dominates the bottom rows
    assert np.mean(np.array(sky_rows) < 180) > 0.95  # "Sky" (0) lies in the top half
    raw = read_label_png(read_bytes(refs[0].label_source))
    assert np.array_equal(adapter.load(refs[0]).label == 255, raw == 11)  # void 11 -> ignore, nothing else


def test_ade20k_shift_and_named_regions(shared_data: Path) -> None:
    adapter = build_adapter({"kind": "ade20k", "root": str(shared_data / "ade-samples"), "split": "",
                             "image_dir": "images", "label_dir": "annotations"})
    refs = adapter.list_items()
    assert [ref.key for ref in refs] == [f"ade20k_ADE_val_0000000{i}" for i in (1, 2, 3)]
    names = adapter.vocab.names

    def dominant(label: np.ndarray) -> str:
        return names[np.bincount(label.ravel(), minlength=256)[:150].argmax()]

    labels = {}
    for ref in refs:
        record = adapter.load(ref)
        raw = read_label_png(read_bytes(ref.label_source))
        np.testing.assert_array_equal(record.label, np.where(raw == 0, 255, raw.astype(np.int64) - 1))
        labels[ref.key] = record.label
    first, third = labels["ade20k_ADE_val_00000001"], labels["ade20k_ADE_val_00000003"]
    assert dominant(first[:60]) == "sky" and dominant(first[-60:]) == "grass"  # house on a lawn under blue sky
    assert dominant(third[:35]) == "sky" and dominant(third[-35:]) == "road"  # street scene
    assert dominant(labels["ade20k_ADE_val_00000002"][150:250, 300:350]) == "building"  # the bell tower


@pytest.mark.parametrize("background", ["keep", "ignore"])
def test_voc_colour_targets(shared_data: Path, background: str) -> None:
    adapter = build_adapter({"kind": "voc", "root": str(shared_data / "voc-samples"), "split": "samples",
                             "image_dir": ".", "label_dir": ".", "image_suffix": "_image.png",
                             "label_suffix": "_target.png", "list_file": "", "label_format": "color",
                             "background": background})
    assert adapter.vocab.name == ("voc_21" if background == "keep" else "voc_20")
    refs = adapter.list_items()
    assert len(refs) == 14
    present = {}
    for ref in refs:
        record = adapter.load(ref)
        assert record.ok and record.label.shape == (513, 513)
        colours = read_label_png(read_bytes(ref.label_source))
        boundary = np.all(colours == (224, 224, 192), axis=2)
        assert boundary.any() and np.all(record.label[boundary] == 255)
        black = np.all(colours == 0, axis=2)
        assert np.all(record.label[black] == (0 if background == "keep" else 255))
        objects = set(np.unique(record.label[~boundary & ~black]).tolist())
        assert objects and objects.isdisjoint({255})  # >= 1 non-background class, every colour decoded
        present[ref.key] = {adapter.vocab.names[i] for i in objects}
    assert present["voc_samples_293"] == {"cow"} and present["voc_samples_0"] == {"aeroplane"}
    assert present["voc_samples_582"] == {"motorbike", "person"}


@pytest.mark.parametrize("category_map", ["by_name", "by_id"])
def test_coco_polygons_match_the_voc_class_pngs(shared_data: Path, category_map: str) -> None:
    root = shared_data / "coco-format-samples"
    adapter = build_adapter({"kind": "coco", "annotation_file": str(root / "annotations.json"), "vocab": "voc_21",
                             "category_map": category_map})
    assert adapter.unmapped_categories == ()
    refs = adapter.list_items()
    assert [ref.key for ref in refs] == ["coco_val_2011_000003", "coco_val_2011_000006", "coco_val_2011_000025"]
    for ref in refs:
        record = adapter.load(ref)
        truth = read_label_png(read_bytes(str(root / "SegmentationClassPNG" / f"{ref.key[9:]}.png")))
        labelled = truth != 255
        assert record.ok and record.label.shape == truth.shape
        assert np.mean(record.label[labelled] == truth[labelled]) > 0.98
        assert set(np.unique(record.label).tolist()) == set(np.unique(truth[labelled]).tolist())


# ---------------------------------------------------------------------------------------------- synthetic data


def test_cityscapes_layout_and_both_label_types(tmp_path: Path) -> None:
    raw_ids = np.array([[7, 8, 26], [0, 33, 24]], dtype=np.uint8)  # road, sidewalk, car / unlabeled, bicycle, person
    for city, frame in (("bonn", "bonn_000001_000019"), ("aachen", "aachen_000000_000019")):
        write(tmp_path / "leftImg8bit/val" / city / f"{frame}_leftImg8bit.png", encode(photo(2, 3)))
        write(tmp_path / "gtFine/val" / city / f"{frame}_gtFine_labelIds.png", encode(raw_ids))
        write(tmp_path / "gtFine/val" / city / f"{frame}_gtFine_labelTrainIds.png", encode(raw_ids // 2))
    for label_type, expected in (("label_ids", [[0, 1, 13], [255, 18, 11]]), ("train_ids", [[3, 4, 13], [0, 16, 12]])):
        adapter = build_adapter({"kind": "cityscapes", "root": str(tmp_path), "label_type": label_type})
        refs = adapter.list_items()
        assert [ref.key for ref in refs] == ["cityscapes_val_aachen_000000_000019", "cityscapes_val_bonn_000001_000019"]
        record = adapter.load(refs[1])
        assert record.ok and record.label.tolist() == expected
    with pytest.raises(ValueError, match="cityscapes_19"):
        build_adapter({"kind": "cityscapes", "root": str(tmp_path), "vocab": "camvid_11"})


def test_coco_stuff_raw_maps_and_train_ids(tmp_path: Path) -> None:
    raw = np.array([[0, 11, 12, 181, 255]], dtype=np.uint8)  # person, unused id 12, stop sign, wood (182), unlabeled
    write(tmp_path / "images/val2017/000000000139.jpg", encode(photo(1, 5), "JPEG"))
    write(tmp_path / "annotations/val2017/000000000139.png", encode(raw))
    write(tmp_path / "annotations/val2017/000000000139_labelTrainIds.png", encode(np.array([[0, 170, 171, 255, 5]],
                                                                                            dtype=np.uint8)))
    adapter = build_adapter({"kind": "coco_stuff", "root": str(tmp_path)})
    (ref,) = adapter.list_items()
    assert ref.key == "coco_stuff_val_000000000139"
    assert adapter.load(ref).label.tolist() == [[0, 255, 11, 170, 255]]
    converted = build_adapter({"kind": "coco_stuff", "root": str(tmp_path), "train_ids": True})
    assert converted.load(converted.list_items()[0]).label.tolist() == [[0, 170, 255, 255, 5]]
    unseen = build_adapter({"kind": "coco_stuff", "root": str(tmp_path), "vocab": "coco_unseen_15"})
    write(tmp_path / "annotations/val2017/000000000139.png", encode(np.array([[20, 0, 255, 24, 181]], dtype=np.uint8)))
    names = unseen.vocab.names
    label = unseen.load(unseen.list_items()[0]).label[0]
    assert names[label[0]] == "cow" and names[label[3]] == "giraffe" and label[1] == label[2] == 255


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major flattening, starting with a run of zeros."""
    counts, current, run = [], 0, 0
    for value in mask.T.ravel().tolist():
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    return {"size": list(mask.shape), "counts": counts + [run]}


def coco_json(tmp_path: Path) -> Path:
    """One 20x20 image: a big sofa square, a small person square on it (listed first), a crowd RLE, an unknown."""
    from pycocotools import mask as mask_utils

    write(tmp_path / "imgs/a.png", encode(photo(20, 20)))
    write(tmp_path / "imgs/b.png", encode(photo(20, 20, seed=1)))
    crowd = np.zeros((20, 20), dtype=np.uint8, order="F")
    crowd[15:19, 0:4] = 1
    compressed = mask_utils.encode(np.asfortranarray(crowd))
    compressed["counts"] = compressed["counts"].decode("ascii")
    unknown = np.zeros((20, 20), dtype=np.uint8)
    unknown[0:3, 16:20] = 1
    square = [[4.0, 4.0, 14.0, 4.0, 14.0, 14.0, 4.0, 14.0]]
    small = [[7.0, 7.0, 10.0, 7.0, 10.0, 10.0, 7.0, 10.0]]
    data = {
        "images": [{"id": 7, "file_name": "b.png", "height": 20, "width": 20},
                   {"id": 3, "file_name": "a.png", "height": 20, "width": 20}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "sofa"}, {"id": 99, "name": "unicorn"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 1, "segmentation": small, "area": 9.0, "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 2, "segmentation": square, "area": 100.0, "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 1, "segmentation": compressed, "area": 16.0, "iscrowd": 1},
            {"id": 4, "image_id": 3, "category_id": 99, "area": 12.0, "iscrowd": 1,
             "segmentation": uncompressed_rle(unknown)},
        ],
    }
    return write(tmp_path / "ann/instances.json", json.dumps(data).encode())


def test_coco_overlaps_rle_crowd_and_unmapped(tmp_path: Path) -> None:
    annotation_file = coco_json(tmp_path)
    adapter = build_adapter({"kind": "coco", "annotation_file": str(annotation_file), "vocab": "voc_21",
                             "image_root": str(tmp_path / "imgs"), "split": "train"})
    assert adapter.unmapped_categories == ("unicorn",)
    refs = adapter.list_items()
    assert [(ref.key, ref.extra) for ref in refs] == [("coco_train_a", (3,)), ("coco_train_b", (7,))]
    label = adapter.load(refs[0]).label
    person, sofa = adapter.vocab.names.index("person"), adapter.vocab.names.index("sofa")
    assert label[8, 8] == person  # smaller annotation drawn last, though listed first
    assert label[5, 12] == sofa and label[12, 5] == sofa
    assert np.all(label[15:19, 0:4] == person)  # crowd RLE drawn like any annotation
    assert np.all(label[0:3, 16:20] == 255)  # category outside the vocabulary -> ignore
    assert label[1, 1] == 0 and label[19, 19] == 0  # unannotated -> background class of voc_21
    assert adapter.load(refs[1]).label.max() == 0  # no annotations at all
    ignored = build_adapter({"kind": "coco", "annotation_file": str(annotation_file), "vocab": "voc_21",
                             "image_root": str(tmp_path / "imgs"), "unannotated": "ignore"})
    assert ignored.load(ignored.list_items()[0]).label[1, 1] == 255
    no_background = build_adapter({"kind": "coco", "annotation_file": str(annotation_file), "vocab": "voc_20",
                                   "image_root": str(tmp_path / "imgs")})
    assert no_background.load(no_background.list_items()[0]).label[1, 1] == 255
    with pytest.raises(ValueError, match="no category"):
        build_adapter({"kind": "coco", "annotation_file": str(annotation_file), "vocab": "camvid_11"})


def bad_and_good_images(root: Path) -> None:
    write(root / "good.png", encode(photo()))
    write(root / "sub/dir/good two.jpg", encode(photo(seed=1), "JPEG"))
    write(root / "a.b.png", encode(photo(seed=2)))
    write(root / "a_b.png", encode(photo(seed=3)))
    write(root / "empty.jpg", b"")
    jpeg = encode(photo(64, 64), "JPEG")
    write(root / "truncated.jpg", jpeg[: len(jpeg) // 2])
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(cmyk, format="JPEG")
    write(root / "cmyk.JPG", cmyk.getvalue())
    write(root / "readme.txt", b"not an image")


def test_folder_bad_images_fail_softly_and_good_ones_load(tmp_path: Path) -> None:
    bad_and_good_images(tmp_path)
    adapter = build_adapter({"kind": "folder", "root": str(tmp_path), "vocab": "toy"})
    refs = adapter.list_items()
    assert len(refs) == 7 and all(KEY_PATTERN.match(ref.key) for ref in refs)
    assert len({ref.key for ref in refs}) == 7
    records = {Path(ref.source).name: adapter.load(ref) for ref in refs}
    assert records["empty.jpg"].error == "zero-byte file" and records["empty.jpg"].image is None
    assert records["truncated.jpg"].error == "truncated image"
    assert records["cmyk.JPG"].ok and records["cmyk.JPG"].meta["notes"] == ["converted from CMYK"]
    for name in ("good.png", "good two.jpg", "a.b.png", "a_b.png"):
        assert records[name].ok and records[name].image.shape == (12, 16, 3) and records[name].label is None
        assert records[name].meta["orig_size"] == [12, 16]
    json.dumps([record.meta for record in records.values()])  # meta is JSON-safe
    assert refs == build_adapter({"kind": "folder", "root": str(tmp_path), "vocab": "toy"}).list_items()


def test_folder_on_a_remote_fsspec_root(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/folder_test/x/one.png", encode(photo()))
    fs.pipe("/folder_test/two.webp", b"\x00corrupt")
    adapter = build_adapter({"kind": "folder", "root": "memory://folder_test", "vocab": "toy"})
    refs = adapter.list_items()
    assert [ref.source for ref in refs] == ["memory:///folder_test/two.webp", "memory:///folder_test/x/one.png"]
    assert not adapter.load(refs[0]).ok and adapter.load(refs[1]).ok


def make_tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_shards_adapter_reads_members_by_offset(tmp_path: Path) -> None:
    label = np.array([[0, 1], [200, 255]], dtype=np.uint8)
    first = make_tar({"s1.jpg": encode(photo(2, 2), "JPEG"), "s1.label.png": encode(label), "s1.json": b"{}",
                      "s2.png": encode(photo(3, 4))})
    second = make_tar({"s3.json": b"{}", "s4.webp": b"junk"})
    write(tmp_path / "000000.tar", first)
    fsspec.filesystem("memory").pipe("/shards_test/000001.tar", second)
    adapter = build_adapter({"kind": "shards", "urls": [str(tmp_path / "000000.tar"), "memory://shards_test/000001.tar"],
                             "vocab": "camvid_11"})
    refs = adapter.list_items()
    assert [ref.key for ref in refs] == ["s1", "s2", "s3", "s4"]
    records = [adapter.load(ref) for ref in refs]
    assert records[0].ok and records[0].label.tolist() == [[0, 1], [255, 255]]
    assert records[1].ok and records[1].image.shape == (3, 4, 3) and records[1].label is None
    np.testing.assert_array_equal(records[1].image, np.asarray(Image.open(io.BytesIO(encode(photo(3, 4))))))
    assert records[2].error.startswith("no image member")
    assert records[3].error == "unrecognised or corrupt image data"
    assert build_adapter({"kind": "shards", "urls": str(tmp_path), "vocab": "camvid_11"}).list_items() == refs[:2]


# ------------------------------------------------------------------------------------------------- registry


def test_unknown_kind_lists_the_kinds() -> None:
    with pytest.raises(ValueError, match="known kinds: .*camvid.*folder"):
        build_adapter({"kind": "imagenet"})


def test_unknown_and_missing_options_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no option\(s\) \['rooot'\]"):
        build_adapter({"kind": "camvid", "rooot": str(tmp_path)})
    with pytest.raises(ValueError, match=r"needs option\(s\) \['root'\]"):
        build_adapter({"kind": "camvid"})
    with pytest.raises(ValueError, match="set vocab=voc_21"):
        build_adapter({"kind": "voc", "root": str(tmp_path), "background": "keep", "vocab": "voc_20"})
    with pytest.raises(ValueError, match="needs a vocabulary"):
        build_adapter({"kind": "folder", "root": str(tmp_path)})


@pytest.mark.parametrize(("kind", "vocab_name"), [("camvid", "camvid_11"), ("ade20k", "ade20k_150"),
                                                  ("voc", "voc_20"), ("cityscapes", "cityscapes_19"),
                                                  ("coco_stuff", "coco_stuff_171")])
def test_default_vocabularies(tmp_path: Path, kind: str, vocab_name: str) -> None:
    adapter = build_adapter({"kind": kind, "root": str(tmp_path)})
    assert adapter.vocab.name == vocab_name and adapter.name == kind
    with pytest.raises(FileNotFoundError):
        adapter.list_items()


def test_every_kind_is_picklable_and_loads_after_unpickling(tmp_path: Path) -> None:
    bad_and_good_images(tmp_path / "folder")
    annotation_file = coco_json(tmp_path)
    adapters = [build_adapter({"kind": "folder", "root": str(tmp_path / "folder"), "vocab": "toy"}),
                build_adapter({"kind": "coco", "annotation_file": str(annotation_file), "vocab": "voc_21",
                               "image_root": str(tmp_path / "imgs")})]
    for adapter in adapters:
        refs = adapter.list_items()
        clone = pickle.loads(pickle.dumps(adapter))
        assert clone.vocab == adapter.vocab
        first, again = adapter.load(refs[0]), clone.load(pickle.loads(pickle.dumps(refs[0])))
        assert first.error == again.error and np.array_equal(first.label, again.label)
    assert set(ADAPTERS) >= {"folder", "coco", "coco_stuff", "voc", "ade20k", "cityscapes", "camvid", "shards"}
