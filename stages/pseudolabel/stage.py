"""The pseudolabel stage: its typed config, and the method of `stages.pseudolabel.steps` run over shards of images.

Per image, CLIP's sliding crops share encoder calls and SAM encodes the image once (`pipeline.models`); stage 1.1
prompts and stage 1.2's automatic masks (batched post-processing on the model's device, `pipeline.models.sam_masks`)
both reuse that one embedding. With ``batch_invariant`` (default) no model call mixes images, so a sample's bytes do
not depend on its batch neighbours; ``batch_invariant: false`` shares CLIP and SAM-encoder calls across the images
of a batch. File encoding of image i overlaps compute of image i+1. Samples follow schema "pseudolabel/1"
(docs/schema.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

import stages.pseudolabel.steps as steps
from pipeline.config import ConfigError, at_least, checked_adapter, checked_templates, checked_vocab
from pipeline.data.records import ImageRecord, ItemRef
from pipeline.data.vocab import Vocabulary
from pipeline.label_report import ReportConfig, write_label_report
from pipeline.models.configs import AmgConfig, ClipConfig, SamConfig, clip_identity, sam_identity
from pipeline.sample_files import encode_image, encode_label_png, mask_record
from pipeline.shards import SampleOutput, ShardDone
from pipeline.stage import Resources, ShardPlan, Stage, StageContext, shard_plans
from stages.pseudolabel.quality import PRODUCERS, QualityAccumulator, finalize_quality, merge_quality

if TYPE_CHECKING:
    from pipeline.models.sam import SamImageEmbeddings
    from pipeline.models.sliding import ClipCanvas, SlidingFeatures

SCHEMA = "pseudolabel/1"
CROP_PORTS = ("prompts", "model")  # optional inputs of the crop labeller (ZSSeg learned prompts, λ-ensemble model)
METHOD_KNOBS = ("vocab", "prompt_templates", "name_variant", "crop", "stride", "image_short_side", "min_crops",
                "top_k", "mode", "merge_policy", "amg", "min_mask_area", "min_predicted_iou", "labeler")
SAMPLE_FILES = {
    "jpg|png": "the RGB image (absent with image_format=none; json.source then references it)",
    "label.png": "uint8 train ids, 255 = unlabelled (uint16 / 65535 above 255 classes)",
    "masks.json": "list of {segmentation (COCO RLE), category_id, score, producer, area, bbox XYWH}",
    "gt.png": "ground-truth train ids in the same convention (when the input has GT and keep_ground_truth)",
    "json": "provenance: schema, key, source, orig_size, vocab, vocab_digest, models, config, present_classes",
}


@dataclass
class PseudoLabelConfig:
    """Knobs of the pseudolabel stage (mirrored by conf/stage/pseudolabel.yaml); see `stages.pseudolabel.steps`.

    Attributes:
        vocab: vocabulary name or YAML path (the classes to label with; GT of the input must use it).
        prompt_templates: template set of `pipeline.models.prompts` ("single" = "a photo of a {}.", as Seifi et al.).
        name_variant: vocabulary name variant used in prompts (None = official names).
        data: input adapter config (``kind`` + its fields, `pipeline.data.registry.build_adapter`); its ``vocab``
            defaults to `vocab`.
        samples_per_shard: images per output shard.
        clip: the CLIP model (``device: auto`` = cuda when available, else cpu, resolved by `Clip.build`).
        sam: the SAM model (``device: auto`` as for clip).
        crop: presence/feature window side in resized pixels (None = CLIP's native input side).
        stride: window step in resized pixels (None = crop // 2, rounded down to the patch size).
        image_short_side: resize the short side to this before CLIP (None keeps the image size).
        min_crops: a class is present when more than this many crops vote for it.
        top_k: point prompts per present class (stage 1.1).
        mode: which producers make the label map: "stage11", "stage12" or "both".
        merge_policy: "stage11_first" or "highest_score" (used when mode = both).
        amg: SAM's automatic mask generator (stage 1.2).
        min_mask_area: smallest kept automatic mask, pixels of the original image.
        min_predicted_iou: smallest kept SAM predicted IoU of an automatic mask.
        labeler: stage 1.2 labeller, "dense" (Seifi et al.) or "crop" (ZSSeg). The crop labeller takes optional
            input ports: `prompts` (a zsseg train node: its learned prompts replace the templates) and `model` (a
            train node: ZSSeg's λ ensemble with its mask-averaged class probabilities).
        ensemble_weight: ZSSeg's λ (release 0.8; <= 0 = CLIP only), used with port `model`.
        model_protocol, model_protocol_overrides: the test-time protocol under which port `model` scores an image
            (its per-pixel probabilities, averaged over each mask, are p_MF).
        image_format: "jpg", "png" or "none" (only a reference in json.source).
        jpeg_quality: JPEG quality (4:4:4 chroma) when image_format = "jpg".
        keep_ground_truth: write gt.png when the input has ground truth.
        report: the review report's knobs (`pipeline.label_report.ReportConfig`).
        batch_invariant: every image's CLIP crops and SAM encoding run in calls of their own, so its sample bytes
            do not depend on which images share its batch (`resources.batch_size` is outside the fingerprint).
            False batches crops and encoder calls across images (``sam.encoder_batch_size``); results then move by
            float noise (~1e-6 in scores) with batch composition.
        resources: workers; batch_size = images per prefetched batch (per model call when not batch_invariant).
    """

    vocab: str = "coco_stuff_171"
    prompt_templates: str = "single"
    name_variant: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    samples_per_shard: int = 256
    clip: ClipConfig = field(default_factory=ClipConfig)
    sam: SamConfig = field(default_factory=lambda: SamConfig(model_type="vit_h"))
    crop: int | None = None
    stride: int | None = None
    image_short_side: int | None = 448
    min_crops: int = 1
    top_k: int = 5
    mode: steps.Mode = "both"
    merge_policy: steps.Policy = "stage11_first"
    amg: AmgConfig = field(default_factory=AmgConfig)
    min_mask_area: int = 100
    min_predicted_iou: float = 0.88
    labeler: Literal["dense", "crop"] = "dense"
    ensemble_weight: float = 0.8
    model_protocol: str = "ifseg"
    model_protocol_overrides: dict[str, Any] = field(default_factory=dict)
    image_format: Literal["jpg", "png", "none"] = "jpg"
    jpeg_quality: int = 95
    keep_ground_truth: bool = True
    report: ReportConfig = field(default_factory=ReportConfig)
    batch_invariant: bool = True
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=1.0, batch_size=16))


def check_config(cfg: PseudoLabelConfig, node: str) -> None:
    """ConfigError naming the key for numbers out of range (choices and keys are checked by `build_config`)."""
    for key in ("samples_per_shard", "top_k", "crop", "stride", "image_short_side", "jpeg_quality"):
        at_least(f"{node}.{key}", getattr(cfg, key), 1)
    for key in ("min_crops", "min_mask_area"):
        at_least(f"{node}.{key}", getattr(cfg, key), 0)


@dataclass
class Loaded:
    """A decoded input (prefetch thread): the record and, when it loaded, its CLIP canvas."""

    record: ImageRecord
    canvas: ClipCanvas | None = None


class PseudoLabelStage(Stage):
    """CLIP + SAM pseudo-labels for every image of `data` (schema "pseudolabel/1", docs/schema.md)."""

    kind = "pseudolabel"
    code_version = "1"
    schema = SCHEMA
    uses_models = True
    Config = PseudoLabelConfig

    def __init__(self, context: StageContext) -> None:
        super().__init__(context)
        node = context.node
        check_config(self.cfg, node)
        self.vocab: Vocabulary = checked_vocab(self.cfg.vocab, f"{node}.vocab")
        self.templates = checked_templates(self.cfg.prompt_templates, f"{node}.prompt_templates")
        self.adapter = checked_adapter(self.cfg.data, self.vocab, node)
        self.quality = QualityAccumulator(self.vocab)
        self.mask_counts = dict.fromkeys(PRODUCERS, 0)
        self._check_ports()

    def _check_ports(self) -> None:
        """Ports `prompts` and `model` (both optional) feed the crop labeller only."""
        node, ports = self.context.node, set(self.context.config.get("inputs") or {})
        if ports - set(CROP_PORTS):
            raise ConfigError(f"{node}.inputs: unknown port(s) {sorted(ports - set(CROP_PORTS))}; the pseudolabel "
                              f"stage takes only {list(CROP_PORTS)} (optional, for labeler: crop)")
        if ports and self.cfg.labeler != "crop":
            raise ConfigError(f"{node}.inputs {sorted(ports)} feed ZSSeg's crop labeller; set {node}.labeler=crop")
        if "model" in ports:
            from pipeline.predict.protocol import load_protocol

            self.model_protocol = load_protocol(self.cfg.model_protocol, [self.cfg.model_protocol_overrides],
                                                f"{node}.model_protocol")

    def identities(self) -> dict[str, str]:
        try:
            models = {"clip": clip_identity(self.cfg.clip), "sam": sam_identity(self.cfg.sam)}
        except FileNotFoundError as error:  # the message starts with the key, e.g. "sam.checkpoint: ..."
            raise ConfigError(f"{self.context.node}.{error}") from None
        return {"vocab": self.vocab.digest(), **models}

    def plan(self) -> list[ShardPlan]:
        return shard_plans(self.adapter.list_items(), self.cfg.samples_per_shard)

    def item_key(self, item: Any) -> str:
        return item.record.key if isinstance(item, Loaded) else item.key

    def setup(self) -> None:
        from pipeline.models.clip import Clip
        from pipeline.models.sam import Sam

        self.clip = Clip.build(self.cfg.clip)
        self.sam = Sam.build(self.cfg.sam)
        self.crop = self.cfg.crop or self.clip.image_size
        patch = self.clip.patch_size
        self.stride = self.cfg.stride or max(patch, self.crop // 2 // patch * patch)
        if self.crop % patch or self.stride % patch:
            raise ConfigError(f"{self.context.node}.crop={self.crop} and .stride={self.stride} must be multiples of "
                              f"CLIP {self.clip.cfg.model_name}'s patch size {patch}")
        self.text = self.clip.encode_text(self.vocab.prompt_names(self.cfg.name_variant), self.templates)
        self.crop_text, self.mf = self._crop_labeller_inputs()
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.context.node}-encode")

    def _crop_labeller_inputs(self) -> tuple[Any, Any]:
        """(text features of the crop labeller: the learned prompts of port `prompts` or the templates', the
        predictor of port `model` or None)."""
        from pipeline.predict.load_trained import load_trained

        upstream, node, device = self.context.upstream, self.context.node, str(self.clip.device)
        text, model = self.text, None
        if "prompts" in upstream:
            prompts = load_trained(upstream["prompts"], self.vocab, device)
            if getattr(prompts, "name", None) != "zsseg" or prompts.clip.identity != self.clip.identity:
                raise ConfigError(f"{node}.inputs.prompts must be a zsseg train node with this node's CLIP "
                                  f"({self.clip.identity}); got {getattr(prompts, 'name', '?')} on "
                                  f"{getattr(getattr(prompts, 'clip', None), 'identity', '?')}")
            text = prompts.text.to(self.clip.device)
        if "model" in upstream:
            model = load_trained(upstream["model"], self.vocab, device)
        return text, model

    def load(self, item: ItemRef) -> Loaded:
        from pipeline.models.sliding import short_side_scale

        record = self.adapter.load(item)
        if not record.ok:
            return Loaded(record)
        scale = short_side_scale(record.image.shape[:2], self.cfg.image_short_side)
        return Loaded(record, self.clip.prepare_canvas(record.image, self.crop, self.stride, scale))

    def process_batch(self, loaded: Sequence[Loaded]) -> list[SampleOutput]:
        """Model calls batched over the good images; file encoding of image i overlaps compute of image i+1."""
        good = [item for item in loaded if item.record.ok]
        outputs = {item.record.key: SampleOutput(item.record.key, None, item.record.meta.get("source", ""),
                                                 error=item.record.error) for item in loaded if not item.record.ok}
        if good:
            features, embeddings = self._model_features(good)
            pending = {}
            for index, (item, feats) in enumerate(zip(good, features, strict=True)):
                result = self._pseudo_label(item.record, feats, embeddings, index)
                pending[item.record.key] = self.encoder.submit(self._encode, item.record, result)
            outputs |= {key: future.result() for key, future in pending.items()}
        return [outputs[item.record.key] for item in loaded]

    def _model_features(self, good: Sequence[Loaded]) -> tuple[list[SlidingFeatures], SamImageEmbeddings]:
        """CLIP sliding features and SAM embeddings of the batch; per image when ``batch_invariant``."""
        canvases, images = [item.canvas for item in good], [item.record.image for item in good]
        if not self.cfg.batch_invariant:
            return self.clip.sliding_features(canvases), self.sam.embed_images(images)
        features = [self.clip.sliding_features([canvas])[0] for canvas in canvases]
        return features, self.sam.embed_images(images, batch_size=1)

    def _pseudo_label(self, record: ImageRecord, feats: SlidingFeatures, embeddings: SamImageEmbeddings,
                      index: int) -> steps.PseudoLabels:
        """The method of `stages.pseudolabel.steps` on image `index` of the batch."""
        cfg, image = self.cfg, record.image
        text = self.text.cpu().numpy()
        present = steps.present_classes(feats.crop_cls.cpu().numpy(), text, cfg.min_crops)
        run11, run12 = steps.producers_to_run(cfg.mode, present.size, record.label is not None)
        stage11 = self._stage11(feats, embeddings, index, text, present) if run11 else []
        stage12 = self._stage12(image, feats, embeddings, index, text, present) if run12 else []
        chosen = steps.label_map_masks(cfg.mode, stage11, stage12)
        label = steps.merge(*chosen, image.shape[:2], cfg.merge_policy, self.vocab.ignore_index,
                            self.vocab.label_dtype)
        return steps.PseudoLabels(present, stage11, stage12, label, [*chosen[0], *chosen[1]])

    def _stage11(self, feats: SlidingFeatures, embeddings: SamImageEmbeddings, index: int, text: np.ndarray,
                 present: np.ndarray) -> list[steps.LabelledMask]:
        sim = steps.patch_similarity(text[present], feats.features.cpu().numpy())
        prompts = steps.point_prompts(sim, self.cfg.top_k, feats.centers(), feats.image_hw)
        return steps.best_of_multimask(present, self.sam.decode_points(embeddings, index, list(prompts)))

    def _stage12(self, image: np.ndarray, feats: SlidingFeatures, embeddings: SamImageEmbeddings, index: int,
                 text: np.ndarray, present: np.ndarray) -> list[steps.LabelledMask]:
        from pipeline.models.sam_masks import automatic_masks_with_arrays

        cfg = self.cfg
        records, masks = automatic_masks_with_arrays(self.sam, image, cfg.amg, embeddings, index)
        keep = [i for i, r in enumerate(records)
                if steps.keep_automatic_mask(r, max(1, cfg.min_mask_area), cfg.min_predicted_iou)]
        if not keep:
            return []
        records, masks = [records[i] for i in keep], masks[keep]
        if cfg.labeler == "crop":
            ids, _ = steps.label_masks_by_crops(image, masks, self.clip, self.crop_text[present], present,
                                                self.clip.cfg.image_batch_size, *self._p_mf(image, masks, present),
                                                weight=cfg.ensemble_weight)
        else:
            ids, _ = steps.label_masks_by_dense_features(masks, feats.features.cpu().numpy(), feats.patch_stride_px,
                                                         text[present], present)
        return steps.labelled_automatic_masks(records, masks, ids)

    def _p_mf(self, image: np.ndarray, masks: np.ndarray, present: np.ndarray) -> tuple[Any, Any]:
        """(p_MF float [N, K]: port `model`'s per-pixel scores averaged over each mask, the present classes'
        columns, not renormalised; seen flags bool [K]), or (None, None) without port `model`."""
        if self.mf is None:
            return None, None
        from pipeline.methods.zsseg_crops import mask_average
        from pipeline.predict.engine import predict_scores

        vocab = self.vocab
        scores = predict_scores(image, self.mf.logits, self.model_protocol, vocab.num_classes, vocab.seen_ids,
                                self.clip.device).float().cpu().numpy()
        seen = np.isin(present, np.asarray(vocab.seen_ids, dtype=np.int64))
        return mask_average(scores, masks)[:, present], seen

    def _encode(self, record: ImageRecord, result: steps.PseudoLabels) -> SampleOutput:
        """The files of one "pseudolabel/1" sample: image, label.png, masks.json, gt.png, json (docs/schema.md)."""
        from pipeline.sample_files import mask_to_rle

        cfg = self.cfg
        masks = [mask_record(m.rle or mask_to_rle(m.mask), m.category_id, m.score, m.producer) for m in result.kept]
        files = {"label.png": encode_label_png(result.label), "masks.json": json.dumps(masks).encode(),
                 "json": json.dumps(self._provenance(record, result), sort_keys=True).encode()}
        if cfg.image_format != "none":
            files[cfg.image_format] = encode_image(record.image, cfg.image_format, cfg.jpeg_quality)
        if record.label is not None and cfg.keep_ground_truth:
            files["gt.png"] = encode_label_png(record.label)
        return SampleOutput(record.key, files, record.meta.get("source", ""), stats=(record, result))

    def _provenance(self, record: ImageRecord, result: steps.PseudoLabels) -> dict[str, Any]:
        cfg = self.cfg
        knobs = {k: asdict(v) if k == "amg" else v for k, v in ((k, getattr(cfg, k)) for k in METHOD_KNOBS)}
        return {"schema": SCHEMA, "key": record.key, "source": record.meta.get("source", ""),
                "dataset": record.meta.get("dataset"), "orig_size": list(record.image.shape[:2]),
                "notes": record.meta.get("notes", []), "vocab": self.vocab.name, "vocab_digest": self.vocab.digest(),
                "models": {"clip": self.clip.identity, "sam": self.sam.identity, **self._upstream_models()},
                "config": {**knobs, "crop": self.crop, "stride": self.stride},
                "present_classes": result.present.tolist(),
                "num_masks": {p: sum(m.producer == p for m in result.kept) for p in PRODUCERS}}

    def _upstream_models(self) -> dict[str, Any]:
        """Fingerprints of the crop labeller's input ports (absent without them), and λ with port `model`."""
        found = {port: self.context.upstream[port].fingerprint for port in CROP_PORTS if port in self.context.upstream}
        if "model" in found:
            found["ensemble_weight"] = self.cfg.ensemble_weight
        return found

    def fold(self, outputs: Sequence[SampleOutput]) -> None:
        for output in outputs:
            if output.stats is None:
                continue
            record, result = output.stats
            for item in result.kept:
                self.mask_counts[item.producer] += 1
            if record.label is not None:
                self.quality.add(record.label, result.stage11, result.stage12, self.cfg.merge_policy)

    def end_shard(self) -> dict[str, Any]:
        extra = {"quality": self.quality.pop(), "num_masks": self.mask_counts}
        self.mask_counts = dict.fromkeys(PRODUCERS, 0)
        return extra

    def finalize(self, done: list[ShardDone]) -> dict[str, Any]:
        """Quality against GT (`pseudolabel_quality.json`) and the review report (`report/`, pipeline.label_report)."""
        extra = finalize_quality([d.extra for d in done], self.vocab, self.cfg.merge_policy, self.context.output_url)
        matrices = merge_quality(d.extra.get("quality") or {} for d in done)
        return {**extra, **write_label_report(self.context.output_url, self.vocab, done, matrices, self.cfg.report,
                                              title=f"Pseudo-labels: {self.context.node}")}

    def manifest_extra(self) -> dict[str, Any]:
        return {"vocab": self.vocab.to_dict(), "sample_files": SAMPLE_FILES}
