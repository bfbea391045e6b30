"""Infinite, per-rank batch streams over stage outputs for the trainers, and the sample decoders they apply.

Each rank reads a disjoint part of the samples (whole shards when there are enough, every world-th sample
otherwise), shuffles with a buffer seeded by (seed, rank, epoch), and resumes at any step exactly where the
uninterrupted stream was (the image decoder's augmentation draws are not checkpointed, so image recipes resume
on the same samples but with other crops and flips).

Image samples become training crops through `ImageLabelDecoder` (mmseg's resize / crop / flip / photometric,
`pipeline.train.augment`).
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
from pipeline.train.augment import PhotoMetricDistortion, cat_max_ratio_crop, rescale_size
from pipeline.train.configs import AugmentConfig
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
    """Decode an image + label map sample and make a square training crop (`augment`, mmseg's recipe).

    Resize (keep ratio; bilinear image rounded to uint8, nearest labels), random crop `image_size` (with the
    `cat_max_ratio` retries), horizontal flip, optional PhotoMetricDistortion on the uint8 crop, then padding to
    `image_size` at the bottom/right with `pad_rgb` (in [0, 1]) and ignore. Draw order is mmseg's; all draws come
    from one generator seeded by (seed, rank).

    Args:
        image_size: crop side S.
        label_file: the label member of the samples.
        ignore_index: label of padding and unlabelled pixels (excluded from the cat_max_ratio counts).
        seed: run seed.
        augment: the knobs (`pipeline.train.configs.AugmentConfig`).
        pad_rgb: pixel value of padding per RGB channel in [0, 1] (ZegCLIP: its normalisation mean, so padding
            is 0 after normalisation as in mmseg, which pads after `Normalize`).

    Returns (pixels float [3, S, S] in [0, 1], labels int64 [S, S]).
    """

    def __init__(self, image_size: int, label_file: str, ignore_index: int, seed: int,
                 augment: AugmentConfig | None = None, pad_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        self.image_size, self.label_file, self.ignore = image_size, label_file, ignore_index
        self.cfg = augment or AugmentConfig()
        self.pad_rgb = torch.tensor(pad_rgb, dtype=torch.float32).view(3, 1, 1)
        self.photometric = PhotoMetricDistortion()
        self.rng = np.random.default_rng(seed + 7919 * rank_and_world()[0])

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        ext = "jpg" if "jpg" in sample else "png"
        if ext not in sample or self.label_file not in sample:
            raise KeyError(f"sample {sample['__key__']} lacks '{ext}' or '{self.label_file}' (image_format: none "
                           "shards cannot be trained on; re-run the producing stage with images stored)")
        label = decode_label_png(sample[self.label_file]).astype(np.int64)
        return self.augment(decode_rgb(sample[ext]), label)

    def augment(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [H, W, 3] image and int [H, W] labels -> (float [3, S, S] in [0, 1], int64 [S, S])."""
        cfg, size = self.cfg, self.image_size
        image, label = self.resize(image, label)
        y1, y2, x1, x2 = cat_max_ratio_crop(self.rng, label, size, cfg.cat_max_ratio, self.ignore)
        image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]
        if self.rng.random() < cfg.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if cfg.photometric:
            image = self.photometric(np.ascontiguousarray(image), self.rng)
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        labels = torch.from_numpy(np.ascontiguousarray(label))
        padded = self.pad_rgb.expand(3, size, size).clone()
        padded[:, :pixels.shape[1], :pixels.shape[2]] = pixels
        padded_labels = torch.full((size, size), self.ignore, dtype=torch.int64)
        padded_labels[:labels.shape[0], :labels.shape[1]] = labels
        return padded, padded_labels

    def resize(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """mmseg `Resize` with ratio_range: r = random() · (max − min) + min, bounds int(S · r), int(factor · S · r)."""
        cfg = self.cfg
        ratio = self.rng.random() * (cfg.max_scale - cfg.min_scale) + cfg.min_scale
        long_bound = None if cfg.long_side_factor is None else int(cfg.long_side_factor * self.image_size * ratio)
        hw = rescale_size(*label.shape, int(self.image_size * ratio), long_bound)
        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float()[None]
        resized = F.interpolate(tensor, size=hw, mode="bilinear", align_corners=False)[0]
        resized = resized.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        labels = F.interpolate(torch.from_numpy(label)[None, None].float(), size=hw, mode="nearest")[0, 0]
        return resized, labels.long().numpy()


def stack_images(batch: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """{"pixels": float [B, 3, S, S] in [0, 1], "labels": int64 [B, S, S]} on `device`."""
    return {"pixels": torch.stack([b[0] for b in batch]).to(device),
            "labels": torch.stack([b[1] for b in batch]).to(device)}
