"""Torch-free configs of the trainable methods: what a train node's `ifseg`, `align` and `zegclip` keys become,
and `MethodConfig`, the part of a train node's config that defines its model.

They live apart from the networks so the driver validates every method knob (`pipeline.config.build_config`:
`train_ifseg.ifseg.lrr=1` is a ConfigError naming the key) without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.models.configs import AmgConfig, ClipConfig, Dinov2Config, SamConfig
from pipeline.train.configs import AugmentConfig, Schedule

MethodName = Literal["ifseg", "align", "zegclip", "zsseg"]  # the keys of `pipeline.methods.registry.METHODS`


@dataclass
class IFSegConfig:
    """Knobs of the IFSeg method. Optimiser defaults are IFSeg's OFA run (§1.4); decoder sizes are our choice.

    Attributes:
        width, depth, heads, mlp_ratio, dropout, attn_dropout, drop_path, pos_grid, logit_scale: see IFSegDecoder.
        word_cross_attention: cross-attention of the tokens to the category words after every layer (IFSeg's
            decoder attends to the prompt words; its ablation: 55.6 -> 22.6 mIoU without). False = the
            self-attention-only port.
        grid_size: side of the token grid a word grid is upsampled to (IFSeg: 32).
        label_size: side of the label map the logits are bilinearly upsampled to for CE (IFSeg: 512).
        lr: AdamW learning rate (IFSeg: 5e-5, for OFA-Base fine-tuning).
        weight_decay: decoupled weight decay on every trainable parameter (fairseq adam: 0.1).
        betas, eps: AdamW moments and epsilon.
        steps: optimiser updates (IFSeg: 2000); warmup_steps: linear warm-up (IFSeg: 0).
        schedule: learning-rate schedule name for the trainer (IFSeg: "cosine").
        batch_size: grids per update, global (IFSeg: 16).
        grad_clip: gradient-norm clip (IFSeg: 1.0); `loop.grad_clip` overrides it.
        augment: training crops of the image path (self-training on images; `AugmentConfig`).
        knn_k, knn_iterations, knn_temperature: test-time post-processing (IFSeg: 3, 25, 1.0).
    """

    width: int = 512
    depth: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attn_dropout: float = 0.0
    drop_path: float = 0.1
    pos_grid: int = 32
    logit_scale: float = 100.0
    word_cross_attention: bool = True
    grid_size: int = 32
    label_size: int = 512
    lr: float = 5e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    steps: int = 2000
    warmup_steps: int = 0
    schedule: Schedule = "cosine"
    batch_size: int = 16
    grad_clip: float | None = 1.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    knn_k: int = 3
    knn_iterations: int = 25
    knn_temperature: float = 1.0


@dataclass
class AlignConfig:
    """Knobs of the alignment method. The paper gives SGD + cosine, batch 5 images, 10 epochs; the lr, momentum
    and weight decay are in its unavailable appendix, so lr 0.01 / momentum 0.9 / wd 1e-4 are our choice.

    Attributes:
        head, heads, mlp_ratio, dropout: see AlignmentModule.
        loss: "tsupcon" (the paper, Eq. 1-4) or "text_ce", a variant that is not the paper: cross-entropy of each
            labelled patch's prototype similarities / temperature, i.e. ℓ_t without the other patches in its
            denominator and without ℓ_im (README, alignment section: on the toy world it learns where TSupCon's
            patch-patch terms drown the 12 near-parallel toy prototypes).
        temperature, include_self_positive: see tsupcon_loss (temperature also divides text_ce's logits).
        count_absent_classes: Eq. 1's normaliser K counts every text feature (default, the paper) or, false,
            only the classes present in the batch (see tsupcon_loss).
        min_fraction: patch-vote threshold of `patch_labels` (the share of a patch its winning class must cover,
            unlabelled pixels counted in the patch; [inferred]). The ignore id is the vocabulary's, not a knob.
        lr, momentum, weight_decay: SGD settings.
        schedule: learning-rate schedule name for the trainer ("cosine" annealing).
        epochs: passes over the training images (paper: 10).
        batch_size: images per update, global (paper: 5).
        grad_clip: gradient-norm clip (null = none; the paper states none); `loop.grad_clip` overrides it.
        augment: training crops (`AugmentConfig`; the paper gives none, so the common 0.75-1.5 resize + flip).
    """

    head: Literal["transformer", "mlp", "linear"] = "transformer"
    heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    loss: Literal["tsupcon", "text_ce"] = "tsupcon"
    temperature: float = 1.0
    include_self_positive: bool = True
    count_absent_classes: bool = True
    min_fraction: float = 0.5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Schedule = "cosine"
    epochs: int = 10
    batch_size: int = 5
    grad_clip: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


PIXEL_STATS = {  # mean, std in 0..255 units per RGB channel
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "clip": ((122.7709, 116.7460, 104.0937), (68.5005, 66.6322, 70.3232)),
}


@dataclass
class ZegCLIPAugmentConfig(AugmentConfig):
    """The ZegCLIP release's train pipeline (`configs/_base_/datasets/cocostuff_512x512.py`): Resize img_scale
    (2048, 512) x ratio 0.5-2.0 (long-side factor 4), RandomCrop cat_max_ratio 0.75, flip 0.5,
    PhotoMetricDistortion. Its own class so that a partial override keeps the other release values."""

    min_scale: float = 0.5
    max_scale: float = 2.0
    long_side_factor: float | None = 4.0
    cat_max_ratio: float = 0.75
    photometric: bool = True


@dataclass
class ZegCLIPConfig:
    """Every ZegCLIP knob; defaults are the released VOC zero-shot config (methods-spec §4.4).

    `norm_decay_mult` defaults to 1.0 on purpose: the release lists `norm`/`ln` with decay_mult 0, but mmcv
    applies only the first matching custom key (longest first) and every trainable parameter also matches
    `backbone` or `head`, so in the release all trainable parameters, norms included, get weight decay 0.01.
    Set 0.0 for the config's apparent intent.

    Release recipe, each a knob: `augment` (see `ZegCLIPAugmentConfig`), `grad_clip` null (the release's
    `optimizer_config = dict()` clips nothing), `reset_optimizer_at_switch` (the transductive run is a second
    mmseg run `--load-from` the inductive checkpoint: weights only, so AdamW's moments start from zero and warmup
    and poly restart), and `double_cls_embedding` (the release's image encoder adds `class_embedding` to the CLS
    position as well as to the CLS token, so the frozen tower sees CLS = 2·class_embedding + pos[0]).
    """

    num_prompts: int = 10  # 10 VOC, 100 COCO, 35 Context
    prompt_layers: list[int] | None = None  # 0-based prompted layers; None = all (paper Table 8 default)
    prompt_dropout: float = 0.1
    decoder_layers: int = 3
    decoder_heads: int = 8
    decoder_ffn_dim: int = 2048
    decoder_dropout: float = 0.1
    focal_weight: float = 100.0
    dice_weight: float = 1.0
    st_focal_weight: float | None = None  # focal weight once self-training runs; None = focal_weight (VOC ST: 20)
    alpha: float = 0.25
    gamma: float = 2.0
    mode: Literal["inductive", "transductive"] = "inductive"
    seen_penalty: float = 0.1  # subtracted from seen-class sigmoid scores at inductive test time
    st_seen_penalty: float = 0.0  # the same after transductive training (release: 0)
    st_start_fraction: float = 0.5
    lr: float = 2e-5
    lr_mult: float = 10.0  # prompts and head (release: backbone and head lr_mult 10)
    weight_decay: float = 0.01
    norm_decay_mult: float = 1.0
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 0.9
    min_lr: float = 1e-6
    batch_size: int = 16
    crop_size: int = 512
    slide_stride: int = 426
    pixel_norm: Literal["imagenet", "clip"] = "imagenet"  # "imagenet" (release) | "clip"
    grad_clip: float | None = None  # release: no clipping; `loop.grad_clip` overrides it
    augment: ZegCLIPAugmentConfig = field(default_factory=ZegCLIPAugmentConfig)
    reset_optimizer_at_switch: bool = True  # transductive: fresh AdamW state where self-training starts (release)
    double_cls_embedding: bool = True  # release: class_embedding added to the CLS token and to its position

    def __post_init__(self) -> None:
        if self.mode not in ("inductive", "transductive"):
            raise ValueError(f"zegclip.mode must be 'inductive' or 'transductive', got {self.mode!r}")
        if self.pixel_norm not in PIXEL_STATS:
            raise ValueError(f"zegclip.pixel_norm must be one of {sorted(PIXEL_STATS)}, got {self.pixel_norm!r}")
        if not 0.0 <= self.st_start_fraction <= 1.0:
            raise ValueError(f"zegclip.st_start_fraction must lie in [0, 1], got {self.st_start_fraction}")


# --- zsseg (methods-spec §2.1) -------------------------------------------------------------------------------------
@dataclass
class ZSSegConfig:
    """Knobs of ZSSeg's learned prompts (Stage A) and its test-time proposal classification (Stage C, SAM proposals).

    Defaults are the release's COCO prompt-learning config (`zero_shot_proposal_classification_learn_prompt_bs32_10k`,
    methods-spec §2.1): 16 context vectors, N(0, 0.02) init, 32 crops per seen class, SGD lr 0.02, momentum 0.9,
    weight decay 5e-4, cosine after 100 constant-factor (0.005) warm-up steps, logits 100·cos. Batch (32) and steps
    (16,000) are the train node's `batch_size` and `loop.steps`.

    Attributes:
        n_ctx: learned prefix tokens between [SOS] and the class name.
        ctx_init_std: std of their normal init.
        samples_per_class: (image, seen-class GT mask) pairs drawn per seen class, with replacement (release: 32).
        sample_seed: seed of that draw (release: SAMPLE_SEED 0).
        flip: also train on the mirrored crop (drawn p = 0.5 per sample; the release's RandomFlip).
        logit_scale: multiplier of the cosine similarities in the CE (release: 100).
        lr, momentum, weight_decay: SGD.
        warmup_steps, warmup_factor: constant warm-up (lr x factor) before the cosine decay.
        sam, amg, min_mask_area, min_predicted_iou: the test-time proposal generator (SAM replaces MaskFormer).
    """

    n_ctx: int = 16
    ctx_init_std: float = 0.02
    samples_per_class: int = 32
    sample_seed: int = 0
    flip: bool = True
    logit_scale: float = 100.0
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    warmup_factor: float = 0.005
    sam: SamConfig = field(default_factory=SamConfig)
    amg: AmgConfig = field(default_factory=AmgConfig)
    min_mask_area: int = 100
    min_predicted_iou: float = 0.88

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.samples_per_class < 1:
            raise ValueError(f"zsseg.n_ctx and zsseg.samples_per_class must be >= 1, got {self.n_ctx}, "
                             f"{self.samples_per_class}")
# --- end zsseg ------------------------------------------------------------------------------------------------------


@dataclass
class MethodConfig:
    """What defines a trained model: the method, its knobs, its frozen backbones and how class names become prompts.

    A train node's config extends it (`stages.train.TrainConfig`); `model.pt` stores the node's config, and
    `pipeline.predict.load_trained` reads these fields back to rebuild the model for any vocabulary.

    Attributes:
        method: "ifseg" | "align" | "zegclip" | "zsseg".
        name_variant: vocabulary name variant for the prompts (e.g. "ifseg", "maskclip"); None = official names.
        prompt_templates: `pipeline.models.prompts` template set of the text classifier (e.g. "maskclip85").
        clip: the CLIP of every method (IFSeg's features and text classifier; ZegCLIP's backbone; align's text).
        dinov2: the frozen feature extractor of `align`.
        ifseg, align, zegclip, zsseg: the knobs of each method (only the chosen method's are used).
    """

    method: MethodName = "ifseg"
    name_variant: str | None = None
    prompt_templates: str = "maskclip85"
    clip: ClipConfig = field(default_factory=ClipConfig)
    dinov2: Dinov2Config = field(default_factory=Dinov2Config)
    ifseg: IFSegConfig = field(default_factory=IFSegConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    zegclip: ZegCLIPConfig = field(default_factory=ZegCLIPConfig)
    zsseg: ZSSegConfig = field(default_factory=ZSSegConfig)
