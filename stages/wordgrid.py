"""IFSeg's image-free data: random word grids of category names ("artificial images") and their label maps.

The sampling law (IFSeg §2.3; `SegmentationDataset.__getitem__`, branch `rand_k-1-33`):

1. Grid size: U and V are drawn independently and uniformly from {min_grid_size, ..., S} with S =
   `max_grid_size` (32 in the paper's runs; S = 16 scores best in its Table 12).
2. Cells: U·V category ids drawn i.i.d. uniformly with replacement from the vocabulary's M classes. No
   background or "unknown" token is ever drawn unless the vocabulary itself contains a word such as "other".
3. Hierarchical variant (IFSeg App. A.1), when `hierarchical=true` and the vocabulary defines coarse groups:
   each cell first draws a coarse group uniformly, then a fine class uniformly inside that group.

Each sample stores only the small U×V grid (`grid.npy`, uint8 or uint16 ids) and a JSON with the seed stream
that made it; consumers upsample with `upsample_grid` / `grid_to_maps`, which reproduce IFSeg's
`torchvision.transforms.Resize(size, InterpolationMode.NEAREST)` on a tensor exactly. Grids hold class ids,
not embeddings, so one set of shards serves any vision-language model.

Random streams: sample i of node N draws from `SeedSequence(seed, spawn_key=(crc32(N), i))`, so a sample's
content depends only on (run seed, node, global sample index): not on shard size, worker count or scheduling.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import ConfigError, checked_vocab
from pipeline.data.vocab import Vocabulary
from pipeline.sample_files import encode_npy
from pipeline.shards import SampleOutput
from pipeline.stage import Resources, ShardPlan, Stage, StageContext, shard_plans

SCHEMA = "wordgrid/1"


@dataclass
class WordGridConfig:
    """Knobs of the wordgrid stage (mirrored by conf/stage/wordgrid.yaml)."""

    vocab: str = "coco_stuff_171"
    num_samples: int = 32000
    samples_per_shard: int = 1000
    max_grid_size: int = 32
    min_grid_size: int = 1
    hierarchical: bool = False
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=1.0, batch_size=1000))


def sample_stream(seed: int, node: str, index: int) -> np.random.Generator:
    """The random stream of sample `index` of node `node` under run seed `seed`."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(node.encode()), index)))


def sample_grid(rng: np.random.Generator, num_classes: int, max_size: int, min_size: int = 1,
                groups: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Draw one word grid.

    Args:
        rng: the sample's random stream.
        num_classes: M, the number of vocabulary classes (ids 0..M-1).
        max_size: S; U and V are uniform on {min_size, ..., S}.
        min_size: smallest side (1 in IFSeg).
        groups: coarse groups as lists of fine ids (hierarchical sampling), or None.

    Returns:
        int64 array [U, V] of class ids.
    """
    height, width = (int(x) for x in rng.integers(min_size, max_size + 1, size=2))
    cells = height * width
    if groups is None:
        ids = rng.integers(0, num_classes, size=cells)
    else:
        sizes = np.array([len(g) for g in groups])
        members = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        coarse = rng.integers(0, len(groups), size=cells)
        within = np.floor(rng.random(cells) * sizes[coarse]).astype(np.int64)
        ids = members[offsets[coarse] + within]
    return ids.reshape(height, width)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output index for torch's `interpolate(mode="nearest")` (float32 scale, floor)."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def upsample_grid(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a [U, V] id grid to [height, width], exactly as IFSeg's Resize(NEAREST)."""
    rows = np.take(grid, nearest_indices(grid.shape[0], height), axis=0)
    return np.take(rows, nearest_indices(grid.shape[1], width), axis=1)


def grid_to_maps(grid: np.ndarray, token_size: int = 32, label_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The model-resolution token map [token_size, token_size] and label map [label_size, label_size] of a grid."""
    return upsample_grid(grid, token_size, token_size), upsample_grid(grid, label_size, label_size)


class WordGridStage(Stage):
    """Writes `num_samples` word grids in shards of `samples_per_shard`."""

    kind = "wordgrid"
    code_version = "1"
    schema = SCHEMA
    Config = WordGridConfig

    def __init__(self, context: StageContext) -> None:
        super().__init__(context)
        cfg = self.cfg
        if cfg.num_samples < 1 or cfg.samples_per_shard < 1:
            raise ConfigError(f"{context.node}.num_samples and .samples_per_shard must be >= 1")
        if not 1 <= cfg.min_grid_size <= cfg.max_grid_size:
            raise ConfigError(f"{context.node}: need 1 <= min_grid_size <= max_grid_size, got "
                              f"{cfg.min_grid_size}, {cfg.max_grid_size}")
        self.vocab: Vocabulary = checked_vocab(cfg.vocab, f"{context.node}.vocab")
        self.vocab_digest = self.vocab.digest()
        self.groups = self._groups() if cfg.hierarchical else None

    def _groups(self) -> list[tuple[int, ...]]:
        if self.vocab.coarse is None:
            raise ConfigError(f"{self.context.node}.hierarchical=true but vocabulary {self.vocab.name!r} defines "
                              "no coarse groups; set hierarchical=false or pick a vocabulary with `coarse:`")
        return list(self.vocab.coarse_groups().values())

    def identities(self) -> dict[str, str]:
        return {"vocab": self.vocab_digest}

    def plan(self) -> list[ShardPlan]:
        return shard_plans(range(self.cfg.num_samples), self.cfg.samples_per_shard)

    def item_key(self, item: int) -> str:
        return f"{self.context.node}_{item:09d}"

    def process_batch(self, loaded: Sequence[int]) -> list[SampleOutput]:
        return [self._sample(index) for index in loaded]

    def _sample(self, index: int) -> SampleOutput:
        cfg, seed, node = self.cfg, self.context.seed, self.context.node
        rng = sample_stream(seed, node, index)
        grid = sample_grid(rng, self.vocab.num_classes, cfg.max_grid_size, cfg.min_grid_size, self.groups)
        meta = {
            "index": index, "height": grid.shape[0], "width": grid.shape[1], "seed": seed,
            "spawn_key": [zlib.crc32(node.encode()), index], "vocab": self.vocab.name,
            "vocab_digest": self.vocab_digest, "max_grid_size": cfg.max_grid_size,
            "hierarchical": cfg.hierarchical, "schema": SCHEMA,
        }
        files = {"grid.npy": encode_npy(grid.astype(self.vocab.label_dtype)),
                 "json": json.dumps(meta, sort_keys=True).encode()}
        return SampleOutput(key=self.item_key(index), files=files, source=f"seed={seed} spawn_key={meta['spawn_key']}")

    def manifest_extra(self) -> dict:
        return {"vocab": self.vocab.to_dict(), "sample_files": {"grid.npy": "uint8/uint16 [U,V] class ids",
                                                                "json": "seed stream and sizes"}}
