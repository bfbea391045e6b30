"""Infinite, per-rank batch streams over stage outputs for the trainers, and the sample decoders they apply.

Each rank reads a disjoint part of the samples (whole shards when there are enough, every world-th sample
otherwise), shuffles with a buffer seeded by (seed, rank, epoch), and resumes at any step exactly where the
uninterrupted stream was (the image decoder's augmentation draws are not checkpointed, so image recipes resume
on the same samples but with other crops and flips).
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.sample_files import decode_label_png
from pipeline.shards import StageOutput
from pipeline.tar_samples import iter_tar_samples, split_for_rank
from pipeline.train.fit import rank_and_world


def rank_samples(output: StageOutput, seed: int, epoch: int, shuffle_buffer: int = 1000) -> Iterator[dict[str, Any]]:
    """One epoch of this rank's raw samples, buffer-shuffled deterministically."""
    rank, world = rank_and_world()
    urls = output.shard_urls()
    rng = random.Random(f"{seed}-{rank}-{epoch}")
    if len(urls) >= world:
        mine = split_for_rank(urls, rank, world, 0, 1)
        rng.shuffle(mine)
        stream: Iterator[dict[str, Any]] = (s for url in mine for s in iter_tar_samples(url))
    else:
        stream = (s for i, s in enumerate(output.samples()) if i % world == rank)
    buffer: list[dict[str, Any]] = []
    for sample in stream:
        buffer.append(sample)
        if len(buffer) >= shuffle_buffer:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def batches_from(output: StageOutput, batch_size: int, seed: int, start_step: int, samples_per_epoch: int,
                 decode: Any) -> Iterator[list[Any]]:
    """Endless lists of `batch_size` decoded samples; resumed at `start_step`, the stream goes on exactly where the
    uninterrupted one was at that step (the samples of its epoch already trained on are skipped undecoded; exact
    when the ranks hold equal shares of the samples)."""
    _, world = rank_and_world()
    epoch, offset = divmod(start_step * batch_size * world, max(1, samples_per_epoch))
    skip = offset // world
    batch: list[Any] = []
    while True:
        produced = False
        for sample in rank_samples(output, seed, epoch):
            produced = True
            if skip:
                skip -= 1
                continue
            batch.append(decode(sample))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if not produced:
            raise RuntimeError(f"no samples for this rank in {output.path}; use fewer workers or more shards")
        epoch += 1


def decode_grid(sample: dict[str, Any]) -> torch.Tensor:
    """A wordgrid sample's [U, V] int64 grid."""
    return torch.from_numpy(np.load(io.BytesIO(sample["grid.npy"])).astype(np.int64))


def decode_rgb(data: bytes) -> np.ndarray:
    """[H, W, 3] uint8 of a sample's `jpg`/`png` image member, as stored (stages write RGB)."""
    return np.asarray(Image.open(io.BytesIO(data)))


class ImageLabelDecoder:
    """Decode an image + label map sample and make a square training crop.

    Augmentation (the usual segmentation recipe; knobs in the train config): resize the short side to
    `image_size · scale` with scale ~ U[min_scale, max_scale], random crop `image_size` (pad with 0 / ignore),
    horizontal flip with p = 0.5.

    Returns (pixels float [3, S, S] in [0, 1], labels int64 [S, S]).
    """

    def __init__(self, image_size: int, label_file: str, ignore_index: int, seed: int,
                 min_scale: float = 0.75, max_scale: float = 1.5) -> None:
        self.image_size, self.label_file, self.ignore = image_size, label_file, ignore_index
        self.scales = (min_scale, max_scale)
        self.rng = np.random.default_rng(seed + 7919 * rank_and_world()[0])

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        ext = "jpg" if "jpg" in sample else "png"
        if ext not in sample or self.label_file not in sample:
            raise KeyError(f"sample {sample['__key__']} lacks '{ext}' or '{self.label_file}' (image_format: none "
                           "shards cannot be trained on; re-run the producing stage with images stored)")
        image = torch.from_numpy(decode_rgb(sample[ext]).copy()).permute(2, 0, 1).float() / 255.0
        label = torch.from_numpy(decode_label_png(sample[self.label_file]).astype(np.int64))
        return self.augment(image, label)

    def augment(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.image_size
        scale = self.rng.uniform(*self.scales) * size / min(image.shape[1:])
        hw = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale)))
        image = F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=hw, mode="nearest")[0, 0].long()
        pad_h, pad_w = max(0, size - hw[0]), max(0, size - hw[1])
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore)
        top = int(self.rng.integers(0, image.shape[1] - size + 1))
        left = int(self.rng.integers(0, image.shape[2] - size + 1))
        image, label = image[:, top:top + size, left:left + size], label[top:top + size, left:left + size]
        if self.rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label.contiguous()


def stack_images(batch: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """{"pixels": float [B, 3, S, S] in [0, 1], "labels": int64 [B, S, S]} on `device`."""
    return {"pixels": torch.stack([b[0] for b in batch]).to(device),
            "labels": torch.stack([b[1] for b in batch]).to(device)}
