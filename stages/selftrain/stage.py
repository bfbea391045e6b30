"""Self-training labels: run a trained model over an image pool and write pseudo-label shards ("pseudolabel/1").

The model is the output of a `train` node (input port `model`), turned into a predictor by
`pipeline.predict.load_trained`. For each image, `pipeline.predict.engine.predict_scores` gives per-class scores at
the original resolution under a test-time protocol preset (`protocol`, default IFSeg: short side 512, whole image,
softmax), and a named policy of `stages.selftrain.policies` turns them into a label map:

* `maskclip_plus`: pseudo-labels only where GT is an unseen class (MaskCLIP+, ZegCLIP †ST, IFSeg+; §1.7, §4.3);
* `zsseg_st`: pseudo-labels on every pixel not covered by seen GT (ZSSeg+ST; §2.2);
* `all_pixels`: argmax over all classes, no GT read (IFSeg Table 4 "pseudo-labels only", Table 7).

Ground-truth guard: the GT-reading policies refuse an evaluation split (`data.split` in `eval_splits`, also
"val2017"-style names) before any work. ZSSeg's label generator run on val reports "seen IoU 100" because it
copies seen GT into its output (ZSSeg issue #18); self-training must never see evaluation GT (methods-spec
§6.2 item 5). `all_pixels` reads no GT, so it may run on any split, but then `gt.png` is never written for an
evaluation split, whatever `keep_ground_truth` says, so no evaluation GT reaches a training shard.

Choices where the sources are silent:
    * IFSeg's K-NN post-processing is off by default (`knn=false`): methods-spec §1.5 item 6. The knob replaces
      the protocol preset's `knn_postprocess` (the ifseg preset turns it on for image-free evaluation).
    * `masks.json` holds one region per class present in the label map (GT-copied pixels included), producer
      "selftrain", score = mean model score of that class over the region; `class_masks=false` writes [].
    * Label quality (`selftrain_quality.json`) compares only model-labelled pixels with GT: GT-copied seen
      pixels are trivially right and would inflate it (the issue #18 artefact).
    * Adapters without a split (image folders, existing shards) pass the guard: their split cannot be known.
    * The protocol's seen-class penalty is applied to the scores (it can only change `all_pixels`, since the
      other policies let only unseen classes compete), and thresholds see the penalised scores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.config import ConfigError, checked_adapter, checked_vocab, resolve_device
from pipeline.data.records import ImageRecord, ItemRef
from pipeline.data.vocab import Vocabulary
from pipeline.label_report import ReportConfig, write_label_report
from pipeline.predict.load_trained import load_trained
from pipeline.predict.protocol import Protocol, load_protocol
from pipeline.sample_files import encode_image, encode_label_png
from pipeline.shards import SampleOutput, join, write_atomic
from pipeline.stage import Resources, ShardPlan, Stage, StageContext, shard_plans
from stages.selftrain.policies import DEFAULT_EVAL_SPLITS, GT_POLICIES, Policy, is_eval_split, pseudo_label
from stages.selftrain.regions import class_regions

SCHEMA = "pseudolabel/1"
QUALITY_FILE = "selftrain_quality.json"
PIXEL_COUNTS = ("from_model", "rejected", "from_gt", "ignore")


@dataclass
class SelfTrainConfig:
    """Knobs of the selftrain stage (mirrored by conf/stage/selftrain.yaml).

    Attributes:
        vocab: vocabulary of the model and of the written labels (its `unseen` list defines the split).
        data: input adapter config for `pipeline.data.registry.build_adapter` (the image pool); `vocab`
            defaults to the stage's.
        policy: "maskclip_plus" | "zsseg_st" | "all_pixels" (see `stages.selftrain.policies`).
        threshold: pixels whose winning score is below it become ignore; score as the protocol gives it
            (softmax/sigmoid probability), not renormalised over the candidate classes. 0.0 = keep all.
        protocol: test-time protocol preset, `conf/protocol/<name>.yaml`.
        protocol_overrides: fields of `pipeline.predict.protocol.Protocol` replacing the preset's (not
            knn_postprocess).
        knn: IFSeg K-NN post-processing while labelling (image-free models only; methods-spec §1.5 item 6).
        eval_splits: split names the GT-reading policies refuse (case-insensitive; a trailing year is ignored).
        image_format: "jpg" | "png" | "none" (then only `json.source` points at the image).
        jpeg_quality: JPEG quality when image_format is "jpg".
        keep_ground_truth: write `gt.png` when the input has GT (never for an evaluation split).
        class_masks: write per-class COCO RLE regions into `masks.json` (else an empty list).
        samples_per_shard: images per output shard.
        device: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ...
        report: the review report's knobs (`pipeline.label_report.ReportConfig`).
        resources: executor resources (not part of the fingerprint).
    """

    vocab: str = "coco_stuff_171"
    data: dict[str, Any] = field(default_factory=lambda: {"kind": "toyworld", "split": "train"})
    policy: Policy = "maskclip_plus"
    threshold: float = 0.0
    protocol: str = "ifseg"
    protocol_overrides: dict[str, Any] = field(default_factory=dict)
    knn: bool = False
    eval_splits: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_SPLITS))
    image_format: Literal["jpg", "png", "none"] = "jpg"
    jpeg_quality: int = 95
    keep_ground_truth: bool = True
    class_masks: bool = True
    samples_per_shard: int = 500
    device: str = "auto"
    report: ReportConfig = field(default_factory=ReportConfig)
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=1.0, batch_size=8))


class SelfTrainStage(Stage):
    """Pseudo-labels an image pool with a trained model under one named policy; reads port `model`."""

    kind = "selftrain"
    code_version = "1"
    schema = SCHEMA
    input_ports = ("model",)
    uses_models = True
    Config = SelfTrainConfig

    def __init__(self, context: StageContext) -> None:
        super().__init__(context)
        cfg, node = self.cfg, context.node
        self.vocab: Vocabulary = checked_vocab(cfg.vocab, f"{node}.vocab")
        self._check_knobs()
        self.split = self._split()
        self.eval_split = is_eval_split(self.split, cfg.eval_splits)
        if cfg.policy in GT_POLICIES and self.eval_split:
            raise ConfigError(
                f"{node}.policy={cfg.policy} copies seen ground truth into its labels, but {node}.data.split="
                f"{self.split!r} is an evaluation split ({node}.eval_splits={list(cfg.eval_splits)}); evaluation GT "
                f"must never reach training data (ZSSeg issue #18: 'seen IoU 100'). Set {node}.data.split to a "
                f"training split, or {node}.policy=all_pixels, which reads no ground truth.")
        self.protocol = self._protocol()
        self.adapter: Any = None
        self.predictor: Any = None
        self._reset_shard()

    def _check_knobs(self) -> None:
        cfg, node = self.cfg, self.context.node
        if cfg.policy in GT_POLICIES and not self.vocab.unseen_ids:
            raise ConfigError(f"{node}.policy={cfg.policy} pseudo-labels unseen classes, but vocabulary "
                              f"{self.vocab.name!r} has no `unseen:` list; pick a split vocabulary or "
                              "policy=all_pixels")
        if not 0.0 <= cfg.threshold <= 1.0:
            raise ConfigError(f"{node}.threshold={cfg.threshold}: a score threshold in [0, 1] (0 rejects nothing)")
        if cfg.samples_per_shard < 1:
            raise ConfigError(f"{node}.samples_per_shard must be >= 1, got {cfg.samples_per_shard}")
        if "knn_postprocess" in cfg.protocol_overrides:
            raise ConfigError(f"{node}.protocol_overrides.knn_postprocess: set {node}.knn instead")
        if not isinstance(cfg.data, dict) or "kind" not in cfg.data:
            raise ConfigError(f"{node}.data must be an input adapter config with a `kind`, e.g. "
                              "{kind: coco_stuff, root: ..., split: train}")

    def _split(self) -> str | None:
        """The adapter's split: `data.split`, else the kind's default split (None when the kind has none)."""
        import dataclasses

        from pipeline.data.registry import ADAPTERS, adapter_fields

        split = self.cfg.data.get("split")
        if split is None and self.cfg.data["kind"] in ADAPTERS:
            default = adapter_fields(self.cfg.data["kind"]).get("split")
            split = None if default is dataclasses.MISSING else default
        return None if split is None else str(split)

    def _protocol(self) -> Protocol:
        """The protocol preset with `protocol_overrides` applied and `knn_postprocess` = `knn`."""
        cfg, node = self.cfg, self.context.node
        protocol = load_protocol(cfg.protocol, [cfg.protocol_overrides, {"knn_postprocess": cfg.knn}],
                                 f"{node}.protocol")
        if protocol.score == "raw" and cfg.threshold > 0:
            raise ConfigError(f"{node}.threshold={cfg.threshold} needs probabilities; the protocol's score is "
                              "'raw' (set protocol_overrides.score to softmax or sigmoid)")
        return protocol

    def identities(self) -> dict[str, str]:
        return {"vocab": self.vocab.digest()}

    def plan(self) -> list[ShardPlan]:
        method = self.context.upstream["model"].manifest.get("config", {}).get("method")
        if self.cfg.knn and method != "ifseg":  # other models ignore K-NN; the engine would then skip their softmax
            raise ConfigError(f"{self.context.node}.knn=true: IFSeg's K-NN post-processing needs an ifseg model, but "
                              f"port model is a {method!r} model; set {self.context.node}.knn=false")
        refs = checked_adapter(self.cfg.data, self.vocab, self.context.node).list_items()
        if not refs:
            raise ConfigError(f"{self.context.node}.data lists no images; check data.root / data.split")
        return shard_plans(refs, self.cfg.samples_per_shard)

    def setup(self) -> None:
        self.device = device = resolve_device(self.cfg.device)
        self.adapter = checked_adapter(self.cfg.data, self.vocab, self.context.node)
        self.predictor = load_trained(self.context.upstream["model"], self.vocab, device, self.cfg.knn)
        if int(self.predictor.num_classes) != self.vocab.num_classes:
            raise ConfigError(f"{self.context.node}: the model predicts {self.predictor.num_classes} classes but "
                              f"vocabulary {self.vocab.name!r} has {self.vocab.num_classes}; use the train node's "
                              "vocab")

    def load(self, item: ItemRef) -> ImageRecord:
        return self.adapter.load(item)

    def item_key(self, item: ItemRef | ImageRecord) -> str:
        return item.key

    def process_batch(self, loaded: Sequence[ImageRecord]) -> list[SampleOutput]:
        return [self._sample(record) for record in loaded]

    def _sample(self, record: ImageRecord) -> SampleOutput:
        source = str(record.meta.get("source", ""))
        if not record.ok or record.image is None:
            return SampleOutput(record.key, None, source=source, error=record.error or "no image")
        if self.cfg.policy in GT_POLICIES and record.label is None:
            return SampleOutput(record.key, None, source=source,
                                error=f"policy {self.cfg.policy} needs ground truth; this image has none")
        vocab = self.vocab
        scores = self._scores(record.image)
        label, targets = pseudo_label(self.cfg.policy, scores, record.label, vocab.seen_ids, vocab.unseen_ids,
                                      vocab.ignore_index, self.cfg.threshold, vocab.label_dtype)
        pixels = self._pixel_counts(label, targets)
        return SampleOutput(record.key, self._files(record, label, scores, pixels), source=source,
                            stats=(pixels, label, record.label, targets))

    def _scores(self, image: np.ndarray) -> np.ndarray:
        """[C, H, W] float32 scores at the image's resolution under the protocol."""
        from pipeline.predict.engine import predict_scores

        scores = predict_scores(image, self.predictor.logits, self.protocol, self.vocab.num_classes,
                                self.vocab.seen_ids, self.device)
        return scores.float().cpu().numpy()

    def _files(self, record: ImageRecord, label: np.ndarray, scores: np.ndarray,
               pixels: dict[str, int]) -> dict[str, bytes]:
        cfg, vocab = self.cfg, self.vocab
        files = {"label.png": encode_label_png(label.astype(vocab.label_dtype, copy=False))}
        if cfg.image_format != "none":
            files[cfg.image_format] = encode_image(record.image, cfg.image_format, cfg.jpeg_quality)
        regions = class_regions(label, scores, vocab.ignore_index) if cfg.class_masks else []
        files["masks.json"] = json.dumps(regions, sort_keys=True).encode()
        if record.label is not None and cfg.keep_ground_truth and not self.eval_split:
            files["gt.png"] = encode_label_png(record.label.astype(vocab.label_dtype, copy=False))
        files["json"] = json.dumps(self._provenance(record, pixels), sort_keys=True).encode()
        return files

    def _provenance(self, record: ImageRecord, pixels: dict[str, int]) -> dict[str, Any]:
        cfg, vocab = self.cfg, self.vocab
        model = self.context.upstream["model"]
        return {
            "schema": SCHEMA, "key": record.key, "source": record.meta.get("source", ""),
            "orig_size": [int(record.image.shape[0]), int(record.image.shape[1])],
            "dataset": record.meta.get("dataset"), "split": self.split,
            "vocab": vocab.name, "vocab_digest": vocab.digest(),
            "models": {"model": model.fingerprint, "model_node": model.manifest.get("node")},
            "config": {"policy": cfg.policy, "threshold": cfg.threshold, "knn": cfg.knn,
                       "protocol": asdict(self.protocol), "unseen_ids": list(vocab.unseen_ids)},
            "pixels": pixels,
        }

    def _reset_shard(self) -> None:
        self._pixels = dict.fromkeys(PIXEL_COUNTS, 0)
        self._quality: Any = None

    def _pixel_counts(self, label: np.ndarray, targets: np.ndarray) -> dict[str, int]:
        """One image's pixel counts: "from_model" (targets labelled by the model), "rejected" (targets left ignore
        by the threshold), "from_gt" (seen GT copied), "ignore" (all ignore pixels, rejected included)."""
        labelled = label != self.vocab.ignore_index
        by_model, num_labelled = int((targets & labelled).sum()), int(labelled.sum())
        return {"from_model": by_model, "rejected": int((targets & ~labelled).sum()),
                "from_gt": num_labelled - by_model, "ignore": int(label.size - num_labelled)}

    def fold(self, outputs: Sequence[SampleOutput]) -> None:
        """Add each image's pixel counts and, when it has GT, its model-labelled pixels to the quality matrix."""
        from pipeline.metrics import ConfusionMatrix

        ignore = self.vocab.ignore_index
        for output in outputs:
            if output.stats is None:
                continue
            pixels, label, gt, targets = output.stats
            for name, count in pixels.items():
                self._pixels[name] += count
            if gt is None:
                continue
            from_model = targets & (label != ignore)
            if self._quality is None:
                self._quality = ConfusionMatrix(self.vocab.num_classes, ignore)
            self._quality.update(label[from_model].astype(np.int64), gt[from_model].astype(np.int64))

    def end_shard(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"pixels": dict(self._pixels)}
        if self._quality is not None:
            extra["quality"] = self._quality.to_dict()
        self._reset_shard()
        return extra

    def finalize(self, done: list[Any]) -> dict[str, Any]:
        """Sum pixel counts and quality matrices over shards; write `selftrain_quality.json` when GT was seen."""
        import fsspec

        from pipeline.metrics import compute_metrics, sum_matrices, to_json

        pixels = dict.fromkeys(PIXEL_COUNTS, 0)
        for marker in done:
            for name, count in marker.extra.get("pixels", {}).items():
                pixels[name] = pixels.get(name, 0) + int(count)
        quality = sum_matrices(m.extra["quality"] for m in done if "quality" in m.extra)
        summary: dict[str, Any] = {"policy": self.cfg.policy, "threshold": self.cfg.threshold, "pixels": pixels}
        if quality is not None:
            metrics = compute_metrics(quality, self.vocab.names, self.vocab.seen_ids, self.vocab.unseen_ids)
            report = {**summary, "measured_on": "model-labelled pixels with GT (GT-copied seen pixels excluded)",
                      "metrics": metrics, "confusion": quality.to_dict()}
            fs, path = fsspec.core.url_to_fs(self.context.output_url)
            write_atomic(fs, join(path, QUALITY_FILE), to_json(report).encode())
            summary |= {"quality_file": QUALITY_FILE,
                        **json.loads(to_json({k: metrics[k] for k in ("mIoU", "pAcc", "mIoU(U)")}))}
        report = write_label_report(self.context.output_url, self.vocab, done,
                                    None if quality is None else {"selftrain": quality}, self.cfg.report,
                                    title=f"Self-training labels: {self.context.node}")
        return {"selftrain": summary, **report}

    def manifest_extra(self) -> dict[str, Any]:
        return {
            "vocab": self.vocab.to_dict(),
            "sample_files": {
                "jpg|png": "RGB image (absent with image_format=none; see json.source)",
                "label.png": "uint8 (uint16) train ids, 255 (65535) = ignore",
                "masks.json": "per-class COCO RLE regions of label.png, producer 'selftrain' (or [])",
                "gt.png": "ground truth in the same convention (training splits only, keep_ground_truth)",
                "json": "provenance: source, orig_size, vocab, model fingerprint, policy, threshold, protocol",
            },
        }

