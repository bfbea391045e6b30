"""ZSSeg Stage A's training set: (image, seen-class GT mask) pairs, 32 per class, as frozen CLIP crop features.

The release (`MaskFormerBinarySemanticDatasetMapper`, `DATASETS.SAMPLE_PER_CLASS`) makes one sample per (image,
class present in its GT) and draws `samples_per_class` of them per seen class with replacement (seed 0). The mask of
a pair is the whole GT region of its class (``gt == c``). Because the image tower is frozen, each pair's crop is
encoded once (and once mirrored, the release's flip); training then runs only the text tower.

Choice: the release's `RandomResizedCrop` of the masked crop is not applied (it would need the image tower at every
step); the crop is the mask's tight box resized to CLIP's input side, the same crop as at test time, and its outside
is filled with the CLIP mean colour in pixel space (the release fills the already normalised image with the raw
mean at training, a train/test mismatch it has; methods-spec §2.1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.methods.zsseg_crops import crop_features
from pipeline.sample_files import decode_label_png
from pipeline.shards import StageOutput

if TYPE_CHECKING:
    from pipeline.models.clip import Clip


def class_images(output: StageOutput, label_file: str, classes: Sequence[int]) -> dict[int, list[str]]:
    """class id -> sorted keys of the samples whose `label_file` map contains it, for each id of `classes`."""
    wanted = set(int(c) for c in classes)
    found: dict[int, list[str]] = {c: [] for c in sorted(wanted)}
    for sample in output.samples():
        if label_file not in sample:
            raise KeyError(f"sample {sample['__key__']} lacks {label_file!r}; zsseg trains on ground truth "
                           "(label_file: gt.png from a pseudolabel node with keep_ground_truth)")
        for c in np.unique(decode_label_png(sample[label_file])):
            if int(c) in wanted:
                found[int(c)].append(sample["__key__"])
    return {c: sorted(keys) for c, keys in found.items()}


def draw_pairs(images: dict[int, list[str]], per_class: int, seed: int) -> list[tuple[str, int]]:
    """`per_class` (key, class) pairs per class, drawn uniformly with replacement, classes ascending; classes
    without an image get none."""
    rng = np.random.default_rng(seed)
    pairs = []
    for c in sorted(images):
        keys = images[c]
        if keys:
            pairs += [(keys[int(i)], c) for i in rng.choice(len(keys), size=per_class, replace=True)]
    return pairs


@dataclass
class CropFeatures:
    """The encoded training pairs.

    Attributes:
        features: float32 [P, D] unit CLIP features of each pair's masked crop.
        mirrored: float32 [P, D] the same of the horizontally flipped crop (None without flip).
        classes: int64 [P] each pair's class train id.
    """

    features: torch.Tensor
    mirrored: torch.Tensor | None
    classes: torch.Tensor


def encode_pairs(output: StageOutput, pairs: Sequence[tuple[str, int]], clip: Clip, label_file: str,
                 flip: bool, batch_size: int = 32) -> CropFeatures:
    """Encode every pair's masked crop (a pair drawn twice is encoded once) in one pass over the samples."""
    from pipeline.train.batches import decode_rgb

    wanted: dict[str, set[int]] = {}
    for key, c in pairs:
        wanted.setdefault(key, set()).add(c)
    encoded: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
    for sample in output.samples():
        classes = sorted(wanted.get(sample["__key__"], ()))
        if not classes:
            continue
        image = decode_rgb(sample["jpg" if "jpg" in sample else "png"])
        label = decode_label_png(sample[label_file])
        masks = np.stack([label == c for c in classes])
        plain = crop_features(clip, image, masks, batch_size)
        mirror = crop_features(clip, image, masks, batch_size, flip=True) if flip else None
        for i, c in enumerate(classes):
            encoded[(sample["__key__"], c)] = (plain[i], None if mirror is None else mirror[i])
    features = torch.stack([encoded[p][0] for p in pairs])
    mirrored = torch.stack([encoded[p][1] for p in pairs]) if flip else None
    return CropFeatures(features, mirrored, torch.tensor([c for _, c in pairs], dtype=torch.int64))


def feature_batches(data: CropFeatures, targets: torch.Tensor, batch_size: int, seed: str,
                    start_step: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless {"features": [B, D], "targets": int64 [B]} batches: each epoch a permutation of the pairs drawn from
    (seed, epoch), and per sample a fair coin for the mirrored crop; resumed at `start_step` it continues exactly
    where the uninterrupted stream was."""
    count = len(targets)
    epoch, offset = divmod(start_step * batch_size, count)
    order: list[int] = []
    flips: list[bool] = []
    while True:
        generator = torch.Generator().manual_seed(hash_seed(f"{seed}-{epoch}"))
        order += torch.randperm(count, generator=generator).tolist()[offset:]
        coins = torch.rand(count, generator=generator) < 0.5
        flips += coins.tolist()[offset:]
        offset, epoch = 0, epoch + 1
        while len(order) >= batch_size:
            index, mirror = torch.tensor(order[:batch_size]), torch.tensor(flips[:batch_size])
            del order[:batch_size], flips[:batch_size]
            features = data.features[index]
            if data.mirrored is not None:
                features = torch.where(mirror[:, None], data.mirrored[index], features)
            yield {"features": features, "targets": targets[index]}


def hash_seed(text: str) -> int:
    """A stable 63-bit seed of a string (Python's `hash` is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
