"""Trainers that consume the shards, on Ray Train: IFSeg (word grids, or images for self-training), the
alignment module with TSupCon (Seifi et al. stage 2), and ZegCLIP.

- `ifseg` (methods-spec §1.9): each grid cell becomes the L2-normalised, prompt-ensembled CLIP text embedding of
  its class; a transformer over the 2-D token map predicts, through the frozen tied text classifier, every cell's
  class (CE on bilinearly upsampled logits). Port `grids` (wordgrid shards) trains image-free; port `images`
  (pseudo-label shards) fine-tunes on CLIP's dense MaskCLIP features of real images (IFSeg Table 4 / IFSeg+),
  starting from port `init` (a previous ifseg node) when given. At test time tokens are CLIP dense features, and
  K-NN probability propagation (K=3, 25 iterations) is applied for image-free models.
- `align`: frozen DINOv2 patch features -> one transformer block -> CLIP text space, trained with TSupCon on
  patch labels voted from the pseudo-label maps (port `images`).
- `zegclip`: deep prompt tuning of CLIP's image tower, relationship-descriptor queries, cross-attention decoder,
  NEL loss (port `images`; `label_file: gt.png` for seen-class ground truth); inductive or transductive.

Output: `<node>/<fingerprint>/model.pt` ({"method", "trainable", "config"}), `train_log.jsonl`, and
`checkpoints/` for resuming a killed run.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.config import ConfigError, checked_vocab
from pipeline.data.vocab import Vocabulary
from pipeline.models.checkpoints import model_weights_identity
from pipeline.shards import StageOutput, join, write_atomic
from pipeline.stage import Stage, StageContext
from pipeline.trainer import LoopConfig, ScalingKnobs

METHOD_PORTS = {"ifseg": ({"grids"}, {"images"}), "align": ({"images"},), "zegclip": ({"images"},)}


@dataclass
class TrainConfig:
    """Knobs of a train node (conf/stage/train.yaml). Method knobs go under `ifseg`, `align` or `zegclip`."""

    method: str = "ifseg"
    vocab: str = "coco_stuff_171"
    name_variant: str | None = None
    prompt_templates: str = "maskclip85"
    clip: dict = field(default_factory=lambda: {"model_name": "ViT-B-16", "pretrained": None})
    dinov2: dict = field(default_factory=lambda: {"name": "dinov2-base", "weights": None})
    ifseg: dict = field(default_factory=dict)
    align: dict = field(default_factory=dict)
    zegclip: dict = field(default_factory=dict)
    batch_size: int = 16
    image_size: int = 512
    label_file: str = "label.png"
    min_scale: float = 0.75
    max_scale: float = 1.5
    loop: LoopConfig = field(default_factory=LoopConfig)
    resources: ScalingKnobs = field(default_factory=ScalingKnobs)


class TrainStage(Stage):
    """Unsharded stage: `run_unsharded` drives Ray Train (or the local backend) and writes model.pt."""

    kind = "train"
    code_version = "1"
    schema = "model/1"
    sharded = False
    uses_models = True
    Config = TrainConfig

    def __init__(self, context: StageContext) -> None:
        super().__init__(context)
        cfg, node = self.cfg, context.node
        if cfg.method not in METHOD_PORTS:
            raise ConfigError(f"{node}.method={cfg.method!r}: choose one of {sorted(METHOD_PORTS)}")
        ports = set(context.config.get("inputs") or {}) - {"init"}
        if not any(ports == set(option) for option in METHOD_PORTS[cfg.method]):
            options = " or ".join(str(sorted(o)) for o in METHOD_PORTS[cfg.method])
            raise ConfigError(f"{node}.inputs must name port(s) {options} (plus optional 'init') for method "
                              f"{cfg.method!r}; got {sorted(ports)}")
        self.vocab: Vocabulary = checked_vocab(cfg.vocab, f"{node}.vocab")

    def identities(self) -> dict[str, str]:
        clip, dinov2 = self.cfg.clip, self.cfg.dinov2
        ids = {"vocab": self.vocab.digest(), "clip": model_weights_identity(
            clip.get("pretrained"), int(clip.get("init_seed", 0)), f"{self.context.node}.clip.pretrained")}
        if self.cfg.method == "align":
            ids["dinov2"] = model_weights_identity(dinov2.get("weights"), int(dinov2.get("init_seed", 0)),
                                                   f"{self.context.node}.dinov2.weights")
        return ids

    def run_unsharded(self) -> dict[str, Any]:
        from dataclasses import replace

        from pipeline.trainer import fit

        scaling = self.cfg.resources
        if self.context.executor == "local":
            scaling = replace(scaling, backend="local")
        fit(TrainJob(self.context), scaling, name=f"{self.context.node}-{self.context.output_url[-16:]}")
        fs, path = fsspec.core.url_to_fs(self.context.output_url)
        rows = [json.loads(line) for line in fs.cat_file(join(path, "train_log.jsonl")).decode().splitlines()]
        steps, batch = self.cfg.loop.steps, self.cfg.batch_size
        return {"num_samples": steps * batch, "final_log": rows[-1] if rows else {}, "vocab": self.vocab.to_dict(),
                "model_file": "model.pt"}

    def train_worker(self) -> None:
        """Runs on every training worker: build the recipe, wrap for DDP, loop, and (rank 0) save."""
        import torch

        from pipeline.trainer import CheckpointStore, rank_and_world, trainable_state, training_loop, worker_device

        device = worker_device(self.cfg.resources.use_gpu)
        torch.manual_seed(self.context.seed)
        from stages.train_methods import RECIPES

        recipe = RECIPES[self.cfg.method](self, device)
        model = _maybe_ddp(recipe.model)
        store = CheckpointStore(self.context.output_url)
        rows = training_loop(model, recipe.optimizer, recipe.batches, lambda b, s: recipe.loss(model, b, s),
                             recipe.lr_factor, self.cfg.loop, store, self.cfg.batch_size)
        if rank_and_world()[0] == 0:
            fs, path = fsspec.core.url_to_fs(self.context.output_url)
            artifact = {"method": self.cfg.method, "trainable": trainable_state(model),
                        "config": json.dumps(self.context.config)}
            buffer = io.BytesIO()
            torch.save(artifact, buffer)
            write_atomic(fs, join(path, "model.pt"), buffer.getvalue())
            write_atomic(fs, join(path, "train_log.jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())

    # -- shared pieces of the recipes ---------------------------------------------------------------------
    def build_clip(self, device: Any) -> Any:
        from pipeline.models.clip import Clip, ClipConfig

        return Clip.build(ClipConfig(**{**self.cfg.clip, "device": str(device)}))

    def text_embeddings(self, clip: Any, vocab: Vocabulary | None = None) -> Any:
        from pipeline.models.prompts import get_templates

        vocab = vocab or self.vocab
        return clip.encode_text(vocab.prompt_names(self.cfg.name_variant), get_templates(self.cfg.prompt_templates))

    def upstream(self, port: str) -> StageOutput:
        return self.context.upstream[port]

    def per_rank_batch(self) -> int:
        from pipeline.trainer import rank_and_world

        return max(1, self.cfg.batch_size // rank_and_world()[1])

    def image_batches(self, device: Any) -> Callable[[int], Iterator[dict[str, Any]]]:
        from pipeline.train_data import ImageLabelDecoder, batches_from, stack_images

        cfg, output = self.cfg, self.upstream("images")
        decoder = ImageLabelDecoder(cfg.image_size, cfg.label_file, self.vocab.ignore_index, self.context.seed,
                                    cfg.min_scale, cfg.max_scale)
        return lambda start: (stack_images(b, device) for b in batches_from(
            output, self.per_rank_batch(), self.context.seed, start, output.num_samples, decoder))

    def load_init(self, model: Any) -> None:
        """Initialise trainable weights from port `init` (a previous train node of the same method)."""
        if "init" in self.context.upstream:
            from pipeline.trainer import load_trainable_state

            load_trainable_state(model, read_artifact(self.upstream("init"))["trainable"])


@dataclass
class TrainJob:
    """The picklable unit Ray Train runs on each worker."""

    context: StageContext

    def run_worker(self) -> None:
        TrainStage(self.context).train_worker()


def _maybe_ddp(model: Any) -> Any:
    from pipeline.trainer import rank_and_world

    if rank_and_world()[1] == 1:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})


def read_artifact(output: StageOutput) -> dict[str, Any]:
    """The model.pt of a finished train node."""
    import torch

    with output.fs.open(join(output.path, "model.pt"), "rb") as handle:
        return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)


def load_predictor(output: StageOutput, vocab: Vocabulary, device: str = "cpu", knn: bool = False) -> Any:
    """Rebuild a finished train node's model for `vocab`; see `stages.train_methods.load_predictor`."""
    from stages.train_methods import load_predictor as load

    return load(output, vocab, device, knn)
