"""Evaluation: score trained models, training-free baselines and pseudo-labels on a labelled split.

One engine for every protocol (methods-spec §6.4): each method predicts every eval image under its protocol
(`pipeline.predict.engine.predict`: keep-ratio resize, whole or sliding window, logits back to the ORIGINAL size,
score transform, seen penalty), predictions are accumulated into one dataset-level confusion matrix per method
(per shard, merged on the driver, exact), and `pipeline.metrics.compute_metrics` derives per-class IoU, mIoU,
pAcc and, when the vocabulary has a seen/unseen split, mIoU(S), mIoU(U) and hIoU of that one all-class prediction.

Ground-truth filters (`gt_filter`):
    null          every class of `vocab` is evaluated (GZSL when the vocabulary has unseen classes).
    unseen_only   IFSeg's COCO "15 unseen" protocol (methods-spec §1.6): GT pixels of seen classes become ignore,
                  the test vocabulary is the unseen subset in `vocab` order (train ids remapped to 0..U-1), so
                  predictors only see those U words. It is a U-way classification of unseen-GT pixels, not GZSL.
                  (Equivalent route: `vocab: coco_unseen_15` with the coco_stuff adapter, which ignores the rest.)

Background words (`background_words`, protocol `background: stuff_names`; Seifi et al. PV-21): logits methods
score the vocabulary plus extra stuff words, and pixels won by those words become `background_class`
(`stages.evaluate.vocab`).

Pseudo-label methods (`kind: labels`) read `label.png` of an upstream pseudolabel/selftrain output for the same
sample keys. Their unlabelled pixels (ignore) are left out of the matrix, so their IoU measures the labels
where they exist; `coverage` (% of valid GT pixels that carry a label) is reported beside it. Under
`unseen_only`, labels of seen classes count as unlabelled. A key absent upstream is counted in
`missing_samples` for that method and written in the sample's json.

Per sample the stage writes `<method>.png` (prediction, eval-vocabulary train ids, uint8 with 255 or uint16 with
65535 as ignore) and `json`; stage level `metrics.json` and `report/` (Markdown, overlays, legend).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.config import ConfigError, checked_adapter, checked_vocab, resolve_device
from pipeline.data.records import ImageRecord, ItemRef
from pipeline.data.vocab import Vocabulary
from pipeline.metrics import ConfusionMatrix, compute_metrics, sum_matrices, to_json
from pipeline.sample_files import decode_label_png, encode_label_png
from pipeline.shards import SampleOutput, join, write_atomic
from pipeline.stage import Resources, ShardPlan, Stage, StageContext, shard_plans
from stages.evaluate.methods import MethodSpec, effective_protocol, parse_methods, penalty_source
from stages.evaluate.upstream_labels import index_keys, read_label_pngs
from stages.evaluate.vocab import fold_background_words, unseen_only_lut, unseen_only_vocab, with_background_words

SCHEMA = "eval/1"
log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Knobs of the eval stage (mirrored by conf/stage/eval.yaml).

    Attributes:
        vocab: vocabulary of the GT label maps (must equal the adapter's).
        data: input-adapter config of the labelled eval split (`pipeline.data.registry.build_adapter`); its
            `vocab` defaults to `vocab` when the adapter takes one.
        protocol: default protocol preset (`conf/protocol/<name>.yaml`) of methods that name none.
        protocol_overrides: protocol fields applied to every method (dataset facts, e.g. short_side).
        methods: `{name, kind, input?, knn?, clip?, templates?, name_variant?, logit_scale?, protocol?,
            protocol_overrides?, miou_denominator?}` per method (`stages.evaluate.methods.MethodEntry`).
        seen_ids_from_vocab: report mIoU(S)/mIoU(U)/hIoU from the vocabulary's unseen list (and give seen classes
            the protocol's seen penalty); no split when false or when the eval vocabulary lacks seen or unseen
            classes (e.g. `gt_filter: unseen_only`, or the all-unseen `coco_unseen_15`).
        gt_filter: null or "unseen_only" (see the module docstring).
        background_words: extra stuff words scored by the logits methods and folded into `background_class`
            (Seifi et al. PV-21; needs protocol `background: stuff_names`); empty = off.
        background_class: the vocabulary class that background words fold into.
        miou_denominator: "mmseg" or "zsseg" for methods that do not set one.
        max_images: evaluate only the first N images of the adapter's (sorted) list; null = all.
        num_report_samples: the first N successfully evaluated images get overlays in the report.
        samples_per_shard: eval images per shard.
        device: torch device for predictors, "auto" = cuda when available, else cpu.
        resources: executor resources (not fingerprinted).
    """

    vocab: str = "toy"
    data: dict[str, Any] = field(default_factory=lambda: {"kind": "toyworld", "split": "val", "num_images": 16})
    protocol: str = "ifseg"
    protocol_overrides: dict[str, Any] = field(default_factory=dict)
    methods: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "maskclip", "kind": "maskclip"}])
    seen_ids_from_vocab: bool = True
    gt_filter: Literal["unseen_only"] | None = None
    background_words: list[str] = field(default_factory=list)
    background_class: str = "background"
    miou_denominator: str = "mmseg"
    max_images: int | None = None
    num_report_samples: int = 6
    samples_per_shard: int = 50
    device: str = "auto"
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=1.0, batch_size=4))


@dataclass
class Loaded:
    """One eval image on a worker: its ref, the decoded record and each labels-method's upstream PNG bytes."""

    ref: ItemRef
    record: ImageRecord
    label_pngs: dict[str, bytes | None]


class EvalStage(Stage):
    """Scores every method on the eval split; see the module docstring."""

    kind = "eval"
    code_version = "1"
    schema = SCHEMA
    uses_models = True
    Config = EvalConfig

    def __init__(self, context: StageContext) -> None:
        super().__init__(context)
        cfg, node = self.cfg, context.node
        if cfg.samples_per_shard < 1 or cfg.num_report_samples < 0 or (cfg.max_images or 1) < 1:
            raise ConfigError(f"{node}: need samples_per_shard >= 1, num_report_samples >= 0, max_images >= 1")
        self.vocab = checked_vocab(cfg.vocab, f"{node}.vocab")
        self.eval_vocab, self.gt_lut = self._eval_vocabulary()
        ports = set(context.config.get("inputs") or {})
        self.methods: list[MethodSpec] = parse_methods(cfg.methods, node, ports, cfg.protocol,
                                                       cfg.protocol_overrides, cfg.miou_denominator)
        self.predict_vocab, self.background_id = self._predict_vocabulary()
        self.adapter = checked_adapter(cfg.data, self.vocab, node)
        split = cfg.seen_ids_from_vocab and bool(self.eval_vocab.unseen_ids) and bool(self.eval_vocab.seen_ids)
        self.unseen_ids = list(self.eval_vocab.unseen_ids) if split else None  # GZSL S/U/hIoU only with both
        self.seen_ids = list(self.eval_vocab.seen_ids) if split else []  # the classes the seen penalty lowers
        self.protocols = {spec.name: spec.protocol for spec in self.methods}  # setup: the models' own penalties
        self.applied: dict[str, dict[str, Any]] = {}  # setup: per method what the workers scored with
        self._reset()

    def _eval_vocabulary(self) -> tuple[Vocabulary, np.ndarray | None]:
        if self.cfg.gt_filter != "unseen_only":
            return self.vocab, None
        if not self.vocab.unseen_ids:
            raise ConfigError(f"{self.context.node}.gt_filter=unseen_only but vocabulary {self.vocab.name!r} lists "
                              "no unseen classes; pick a vocabulary with `unseen:` or set gt_filter=null")
        return unseen_only_vocab(self.vocab), unseen_only_lut(self.vocab)

    def _predict_vocabulary(self) -> tuple[Vocabulary, int | None]:
        """The vocabulary logits methods score (eval vocabulary + background words) and the background id."""
        cfg, node = self.cfg, self.context.node
        logits_methods = sorted(m.name for m in self.methods if not m.is_labels)
        stuff = sorted(m.name for m in self.methods
                       if not m.is_labels and m.protocol.background == "stuff_names")
        if not cfg.background_words:
            if stuff:
                raise ConfigError(f"{node}: methods {stuff} use protocol background=stuff_names but "
                                  f"{node}.background_words is empty; list the stuff words")
            return self.eval_vocab, None
        if stuff != logits_methods:
            raise ConfigError(f"{node}.background_words is set: give the methods {logits_methods} protocol "
                              f"background=stuff_names (e.g. {node}.protocol_overrides.background=stuff_names)")
        if cfg.gt_filter is not None or cfg.background_class not in self.eval_vocab.names:
            raise ConfigError(f"{node}.background_words needs gt_filter=null and background_class="
                              f"{cfg.background_class!r} among the classes of {self.eval_vocab.name!r}")
        try:
            extended = with_background_words(self.eval_vocab, [str(w) for w in cfg.background_words])
        except ValueError as error:
            raise ConfigError(f"{node}.background_words: {error}") from None
        return extended, self.eval_vocab.names.index(cfg.background_class)

    def identities(self) -> dict[str, str]:
        """Vocabulary digest, and per method its resolved protocol and (maskclip) CLIP weights identity."""
        from pipeline.fingerprint import without_weight_refs
        from pipeline.models.checkpoints import model_weights_identity

        ids = {"vocab": self.vocab.digest(), "eval_vocab": self.eval_vocab.digest()}
        for spec in self.methods:
            ids[f"method:{spec.name}"] = json.dumps(without_weight_refs(spec.record()), sort_keys=True)
            if spec.kind == "maskclip":
                clip, key = spec.entry.clip, f"{self.context.node}.methods.clip.pretrained"
                ids[f"weights:{spec.name}"] = model_weights_identity(clip.pretrained, clip.init_seed, key)
        return ids

    def plan(self) -> list[ShardPlan]:
        """Shards of `samples_per_shard` eval images; each item carries its labels-methods' upstream shard URLs."""
        sources = {spec.name: self._label_index(spec) for spec in self.methods if spec.is_labels}
        refs = self.adapter.list_items()[: self.cfg.max_images]
        items = [(ref, tuple((name, index.get(ref.key)) for name, index in sources.items())) for ref in refs]
        return shard_plans(items, self.cfg.samples_per_shard)

    def _label_index(self, spec: MethodSpec) -> dict[str, str]:
        """Key -> upstream shard URL of a labels method, after checking the upstream labels' vocabulary."""
        output = self.context.upstream[spec.input]
        upstream_vocab = output.manifest.get("vocab")
        if upstream_vocab is None:
            raise ConfigError(f"{self.context.node}.methods[{spec.name}]: upstream {spec.input!r} records no "
                              "vocabulary in its manifest; a labels method reads pseudolabel/selftrain outputs")
        names = tuple(entry["name"] for entry in upstream_vocab.get("classes", []))
        if names != self.vocab.names:
            raise ConfigError(f"{self.context.node}.methods[{spec.name}]: upstream {spec.input!r} labels use "
                              f"vocabulary {upstream_vocab.get('name')!r}, not {self.vocab.name!r}; evaluate them "
                              "with the vocabulary they were made with")
        return index_keys(output)

    def item_key(self, item: Loaded | tuple[ItemRef, tuple]) -> str:
        return item.ref.key if isinstance(item, Loaded) else item[0].key

    # ----------------------------------------------------------------- workers
    def setup(self) -> None:
        """Build the predictors of the logits methods once per worker."""
        from pipeline.predict.predictors import build_predictor

        self.device = resolve_device(self.cfg.device)
        self.predictors = {spec.name: build_predictor(spec.entry, self.predict_vocab, self.context.upstream,
                                                      self.device)
                           for spec in self.methods if not spec.is_labels}
        logits_methods = [spec for spec in self.methods if not spec.is_labels]
        self.protocols = {spec.name: effective_protocol(spec, self.predictors[spec.name]) for spec in logits_methods}
        self.applied = {spec.name: {"seen_penalty": self.protocols[spec.name].seen_penalty,
                                    "source": penalty_source(spec, self.predictors[spec.name]),
                                    "knn_postprocess": self.protocols[spec.name].knn_postprocess}
                        for spec in logits_methods}

    def _reset(self) -> None:
        size, ignore = self.eval_vocab.num_classes, self.eval_vocab.ignore_index
        self.matrices = {spec.name: ConfusionMatrix(size, ignore) for spec in self.methods}
        self.coverage = {spec.name: [0, 0] for spec in self.methods if spec.is_labels}
        self.missing = {spec.name: 0 for spec in self.methods if spec.is_labels}
        self.report_keys: list[str] = []

    def iter_loaded(self, plan: ShardPlan) -> Iterator[Loaded]:
        """Decode each image (adapter) and fetch the labels-methods' upstream PNGs of this shard in one pass each."""
        wanted: dict[str, set[str]] = {}
        for ref, sources in plan.items:
            for _, url in sources:
                if url is not None:
                    wanted.setdefault(url, set()).add(ref.key)
        pngs = read_label_pngs(wanted)
        for ref, sources in plan.items:
            labels = {name: pngs.get((url, ref.key)) if url else None for name, url in sources}
            yield Loaded(ref, self.adapter.load(ref), labels)

    def process_batch(self, loaded: Sequence[Loaded]) -> list[SampleOutput]:
        return [self._evaluate(item) for item in loaded]

    def fold(self, outputs: Sequence[SampleOutput]) -> None:
        """Accumulate each evaluated sample's predictions into the shard's matrices; remember report candidates."""
        for output in outputs:
            if output.stats is None:
                continue
            preds, gt = output.stats
            for name, pred in preds.items():
                self._accumulate(name, pred, gt)
            if len(self.report_keys) < self.cfg.num_report_samples:
                self.report_keys.append(output.key)

    def _evaluate(self, item: Loaded) -> SampleOutput:
        record, key, source = item.record, item.ref.key, item.ref.source
        if not record.ok:
            return SampleOutput(key, None, source=source, error=record.error)
        if record.label is None:
            return SampleOutput(key, None, source=source, error="no ground-truth label map; eval data needs labels")
        gt = self._map_gt(record.label)
        preds = {spec.name: self._predict(spec, record.image, item.label_pngs.get(spec.name))
                 for spec in self.methods}
        problem = self._check(preds, gt)
        if problem:
            return SampleOutput(key, None, source=source, error=problem)
        dtype = self.eval_vocab.label_dtype
        files = {f"{name}.png": encode_label_png(pred.astype(dtype))
                 for name, pred in preds.items() if pred is not None}
        meta = {"schema": SCHEMA, "key": key, "source": source, "orig_size": list(gt.shape),
                "vocab": self.eval_vocab.name, "vocab_digest": self.eval_vocab.digest(),
                "gt_filter": self.cfg.gt_filter, "methods": sorted(files),
                "missing": sorted(name for name, pred in preds.items() if pred is None)}
        files["json"] = json.dumps(meta, sort_keys=True).encode()
        return SampleOutput(key, files, source=source, stats=(preds, gt))

    def _check(self, preds: dict[str, np.ndarray | None], gt: np.ndarray) -> str | None:
        """Why this sample cannot be accumulated (sizes, ids outside the eval vocabulary), or None."""
        size, ignore = self.eval_vocab.num_classes, self.eval_vocab.ignore_index
        for name, ids in (("ground truth", gt), *preds.items()):
            if ids is None:
                continue
            if ids.shape != gt.shape:
                return f"{name}: prediction size {list(ids.shape)} differs from the GT size {list(gt.shape)}"
            bad = (ids != ignore) & ((ids < 0) | (ids >= size))
            if bad.any():
                return f"{name}: ids {np.unique(ids[bad])[:5].tolist()} outside the {size} eval classes"
        return None

    def _map_gt(self, label: np.ndarray) -> np.ndarray:
        """Eval-vocabulary GT: [H, W] int64, ignore = `eval_vocab.ignore_index`."""
        label = np.asarray(label, dtype=np.int64)
        return label if self.gt_lut is None else self.gt_lut[np.minimum(label, len(self.gt_lut) - 1)]

    def _predict(self, spec: MethodSpec, image: np.ndarray, label_png: bytes | None) -> np.ndarray | None:
        """[H, W] int64 eval-vocabulary ids (labels methods: ignore where unlabelled; None when missing)."""
        if spec.is_labels:
            return None if label_png is None else self._map_gt(decode_label_png(label_png))
        from pipeline.predict.engine import predict

        predictor = self.predictors[spec.name]
        pred = predict(image, predictor.logits, self.protocols[spec.name], self.predict_vocab.num_classes,
                       self.seen_ids, self.device)
        if self.background_id is None:
            return pred
        return fold_background_words(pred, self.eval_vocab.num_classes, self.background_id)

    def _accumulate(self, name: str, pred: np.ndarray | None, gt: np.ndarray) -> None:
        ignore = self.eval_vocab.ignore_index
        if name not in self.coverage:
            self.matrices[name].update(pred, gt)
            return
        if pred is None:
            self.missing[name] += 1
            return
        labelled = (pred != ignore) & (gt != ignore)
        self.coverage[name][0] += int(labelled.sum())
        self.coverage[name][1] += int((gt != ignore).sum())
        self.matrices[name].update(np.where(labelled, pred, 0), np.where(labelled, gt, ignore))

    def end_shard(self) -> dict[str, Any]:
        """Per method: the shard's confusion matrix (and labels coverage/missing counts); report candidates."""
        extra = {"confusion": {name: cm.to_dict() for name, cm in self.matrices.items()},
                 "coverage": self.coverage, "missing": self.missing, "report_keys": self.report_keys,
                 "applied": self.applied}
        self._reset()
        return extra

    # ------------------------------------------------------------------ driver
    def finalize(self, done: list[Any]) -> dict[str, Any]:
        """Merge the shards' matrices, write metrics.json and report/; return `{"metrics": headline numbers}`."""
        import fsspec

        from pipeline.report import metric_table, write_report
        from stages.evaluate.report_samples import gather_samples

        metrics = {spec.name: self._method_metrics(spec, done) for spec in self.methods}
        document = {"schema": SCHEMA, "vocab": self.eval_vocab.name, "vocab_digest": self.eval_vocab.digest(),
                    "gt_filter": self.cfg.gt_filter, "background_words": list(self.cfg.background_words),
                    "num_images": sum(d.count for d in done),
                    "num_failed": sum(d.failed for d in done), "methods": metrics}
        fs, root = fsspec.core.url_to_fs(self.context.output_url)
        write_atomic(fs, join(root, "metrics.json"), to_json(document).encode())
        keys = [key for d in done for key in d.extra.get("report_keys", [])][: self.cfg.num_report_samples]
        shards = [join(self.context.output_url, f"{d.shard}.tar") for d in done if d.extra.get("report_keys")]
        samples = gather_samples(self.adapter, self._map_gt, shards, keys)
        write_report(join(self.context.output_url, "report"), metrics, list(self.eval_vocab.names), samples,
                     title=f"Evaluation: {self.context.node} ({self.eval_vocab.name})")
        log.info("%s metrics (%%):\n%s", self.context.node, metric_table(metrics))
        return {"metrics": json.loads(to_json({name: headline(m) for name, m in metrics.items()}, indent=None))}

    def _method_metrics(self, spec: MethodSpec, done: list[Any]) -> dict[str, Any]:
        """Metrics of one method from the sum of its per-shard matrices, plus its record and labels coverage."""
        matrix = sum_matrices(marker.extra["confusion"][spec.name] for marker in done)
        if matrix is None:
            matrix = ConfusionMatrix(self.eval_vocab.num_classes, self.eval_vocab.ignore_index)
        result = compute_metrics(matrix, list(self.eval_vocab.names), unseen_ids=self.unseen_ids,
                                 miou_denominator=spec.miou_denominator)
        result.update(spec.record())
        used = {json.dumps(m.extra.get("applied", {}).get(spec.name), sort_keys=True) for m in done} - {"null"}
        if len(used) == 1:  # what the workers scored with: the model's own penalty (unless overridden), its K-NN
            applied = json.loads(used.pop())
            result["protocol"]["seen_penalty"] = applied["seen_penalty"]
            result["protocol"]["knn_postprocess"] = applied["knn_postprocess"]
            result["seen_penalty_source"] = applied["source"]
        if spec.is_labels:
            labelled = sum(m.extra["coverage"][spec.name][0] for m in done)
            valid = sum(m.extra["coverage"][spec.name][1] for m in done)
            result["coverage"] = 100.0 * labelled / valid if valid else float("nan")
            result["missing_samples"] = sum(m.extra["missing"][spec.name] for m in done)
        return result

    def manifest_extra(self) -> dict[str, Any]:
        return {"vocab": self.eval_vocab.to_dict(),
                "sample_files": {"<method>.png": "prediction, eval-vocabulary train ids (uint8/uint16, ignore)",
                                 "json": "key, source, size, methods written and missing"}}


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one method (manifest fields)."""
    keys = ("mIoU", "pAcc", "mAcc", "mIoU(S)", "mIoU(U)", "hIoU", "coverage", "missing_samples")
    return {key: metrics[key] for key in keys if key in metrics}
