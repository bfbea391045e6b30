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
- `zsseg` (methods-spec §2.1 Stage A): 16 learned context vectors before the class name, through CLIP's frozen
  text tower, trained by CE (100 · cos) on frozen CLIP features of masked crops of seen-class GT regions, 32 per
  class (port `images` with `label_file: gt.png`); its predictor classifies SAM proposals with them.

Each method's recipe is in `stages.train.recipes`; the loop, checkpoints and Ray Train in `pipeline.train`.
Output: `<node>/<fingerprint>/model.pt` ({"method", "trainable", "config"}), `train_log.jsonl` (with timings), and
`checkpoints/` for resuming a killed run; the manifest's `final_log` is the last log row without its samples/s,
which goes into the run record (`run.json`), so manifests are byte-identical across runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.config import ConfigError, checked_templates, checked_vocab
from pipeline.data.vocab import Vocabulary
from pipeline.methods.configs import MethodConfig
from pipeline.models.checkpoints import model_weights_identity
from pipeline.progress import current
from pipeline.stage import Stage, StageContext
from pipeline.train.configs import LoopConfig, ScalingKnobs

METHOD_PORTS = {"ifseg": ({"grids"}, {"images"}), "align": ({"images"},), "zegclip": ({"images"},),
                "zsseg": ({"images"},)}


@dataclass
class TrainConfig(MethodConfig):
    """Knobs of a train node (conf/stage/train.yaml): the model's (`MethodConfig`: method, prompts, `clip`,
    `dinov2`, and the method knobs under `ifseg`, `align` or `zegclip`) and the trainer's below.

    Attributes:
        vocab: the training vocabulary (grid ids and label maps are its train ids).
        batch_size: global samples per step, split evenly across workers.
        image_size: square training crop of the image methods.
        label_file: the label member of image samples (`label.png` pseudo-labels or `gt.png` ground truth).
        (Crop augmentation and gradient clipping are the method's: `<method>.augment`, `<method>.grad_clip`.)
        loop: the step loop (steps, checkpoints, logging, precision).
        resources: where it runs (not part of the fingerprint).
    """

    vocab: str = "coco_stuff_171"
    batch_size: int = 16
    image_size: int = 512
    label_file: str = "label.png"
    loop: LoopConfig = field(default_factory=LoopConfig)
    resources: ScalingKnobs = field(default_factory=ScalingKnobs)


class TrainStage(Stage):
    """Unsharded stage: `run_unsharded` drives Ray Train (or the local backend) and writes model.pt."""

    kind = "train"
    # 2: release ZegCLIP recipe (mmseg crops, no clip, reset at switch, double CLS), IFSeg words;
    # 3: align.min_fraction reaches the patch vote, align/zegclip ignore the vocabulary's unlabelled id
    code_version = "3"
    schema = "model/1"
    sharded = False
    uses_models = True
    Config = TrainConfig

    def __init__(self, context: StageContext) -> None:
        super().__init__(context)
        cfg, node = self.cfg, context.node
        ports = set(context.config.get("inputs") or {}) - {"init"}
        if not any(ports == set(option) for option in METHOD_PORTS[cfg.method]):
            options = " or ".join(str(sorted(o)) for o in METHOD_PORTS[cfg.method])
            raise ConfigError(f"{node}.inputs must name port(s) {options} (plus optional 'init') for method "
                              f"{cfg.method!r}; got {sorted(ports)}")
        self.vocab: Vocabulary = checked_vocab(cfg.vocab, f"{node}.vocab")
        checked_templates(cfg.prompt_templates, f"{node}.prompt_templates")

    def identities(self) -> dict[str, str]:
        clip, dinov2, node = self.cfg.clip, self.cfg.dinov2, self.context.node
        ids = {"vocab": self.vocab.digest(),
               "clip": model_weights_identity(clip.pretrained, clip.init_seed, f"{node}.clip.pretrained")}
        if self.cfg.method == "align":
            ids["dinov2"] = model_weights_identity(dinov2.weights, dinov2.init_seed, f"{node}.dinov2.weights")
        if self.cfg.method == "zsseg":  # its test-time proposal generator
            sam = self.cfg.zsseg.sam
            ids["sam"] = model_weights_identity(sam.checkpoint, sam.init_seed, f"{node}.zsseg.sam.checkpoint",
                                                allow_tags=False)
        return ids

    def run_unsharded(self) -> dict[str, Any]:
        from pipeline.train.checkpoints import CheckpointStore, read_log
        from pipeline.train.fit import fit

        if self.context.forced:  # force=[node]: train from step 0, not from the previous run's last checkpoint
            CheckpointStore(self.context.output_url).clear()
        scaling = self.cfg.resources
        if self.context.executor == "local":
            scaling = replace(scaling, backend="local")
        fit(TrainJob(self.context), scaling, name=f"{self.context.node}-{self.context.output_url[-16:]}")
        rows = read_log(self.context.output_url)
        final = dict(rows[-1]) if rows else {}
        if "samples_per_s" in final:  # a timing: into the run record (run.json), never the manifest
            current(self.context.node).metrics["train_samples_per_s"] = final.pop("samples_per_s")
        return {"num_samples": self.cfg.loop.steps * self.cfg.batch_size, "final_log": final,
                "vocab": self.vocab.to_dict(), "model_file": "model.pt"}

    def train_worker(self) -> None:
        """Runs on every training worker: build the method's recipe, wrap for DDP, loop, and (rank 0) save."""
        import torch

        from pipeline.train.checkpoints import CheckpointStore, save_log, save_model
        from pipeline.train.fit import prepare_model, rank_and_world, worker_device
        from pipeline.train.loop import training_loop
        from stages.train.recipes import RECIPES, RecipeInputs

        cfg, url = self.cfg, self.context.output_url
        device = worker_device(cfg.resources.use_gpu)
        torch.manual_seed(self.context.seed)
        rank, world = rank_and_world()
        inputs = RecipeInputs(cfg, self.vocab, self.context.upstream, self.context.seed, device,
                              per_rank_batch=max(1, cfg.batch_size // world))
        recipe = RECIPES[cfg.method](inputs)
        model = prepare_model(recipe.model)
        rows = training_loop(model, recipe, cfg.loop, CheckpointStore(url), cfg.batch_size, self.context.node)
        if rank == 0:
            save_model(url, cfg.method, model, self.context.config)
            save_log(url, rows)


@dataclass
class TrainJob:
    """The picklable unit Ray Train runs on each worker."""

    context: StageContext

    def run_worker(self) -> None:
        TrainStage(self.context).train_worker()
