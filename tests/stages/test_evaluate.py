"""The eval stage: exact wiring (oracle = 100 mIoU), shard-merge invariance, unseen-only GT, labels, report, e2e."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.data.images import read_label_png
from pipeline.data.registry import build_adapter
from pipeline.data.vocab import load_vocab
from pipeline.executor import run_shard
from pipeline.metrics import ConfusionMatrix, compute_metrics
from pipeline.predict import predictors
from pipeline.predict.engine import predict
from pipeline.predict.protocol import load_protocol
from pipeline.sample_files import encode_label_png
from pipeline.shards import SampleOutput, StageOutput, commit_shard, write_stage_index
from pipeline.stage import StageContext
from pipeline.tar_samples import iter_tar_samples
from stages.evaluate import EvalStage
from stages.evaluate.vocab import unseen_only_lut

TOY_DATA = {"kind": "toyworld", "split": "val", "num_images": 5, "size": 64}
ORACLE_DATA = {"oracle": TOY_DATA}  # method name -> the data whose GT the `oracle` kind returns


def digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()


def one_hot_logits(label: np.ndarray, num_classes: int) -> torch.Tensor:
    label = torch.from_numpy(np.where(label >= num_classes, 0, label).astype(np.int64))
    return F.one_hot(label, num_classes).permute(2, 0, 1)[None].float() * 10.0


class Oracle:
    """Looks the image up by content hash and returns its (mapped) GT as one-hot logits; needs identity resizing."""

    def __init__(self, name: str, num_classes: int, table: dict[str, np.ndarray]) -> None:
        self.name, self.num_classes, self.table = name, num_classes, table

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return one_hot_logits(self.table[digest(pixels_to_uint8(pixels))], self.num_classes)


class ColourModel:
    """A fixed, non-trivial model: class = ((red + green) // 23) mod C at every pixel (0..255 values)."""

    def __init__(self, name: str, num_classes: int) -> None:
        self.name, self.num_classes = name, num_classes

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        red_green = (pixels[0, :2] * 255).round().long().sum(dim=0)
        return one_hot_logits(((red_green // 23) % self.num_classes).numpy(), self.num_classes)


class CloseCall:
    """Everywhere: logit 0.2 for sky (seen), 0.1 for tree (unseen), 0 for the rest."""

    def __init__(self, name: str, num_classes: int) -> None:
        self.name, self.num_classes = name, num_classes

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(1, self.num_classes, *pixels.shape[-2:])
        logits[:, 0], logits[:, 5] = 0.2, 0.1
        return logits


@pytest.fixture
def oracle_kind(monkeypatch):
    """Registers method kinds `oracle` (GT of `ORACLE_DATA[method name]`, optionally unseen-only), `colour` and
    `close_call`."""

    def build_oracle(method, vocab, upstream, device):
        adapter = build_adapter(ORACLE_DATA[method.name])
        lut = unseen_only_lut(adapter.vocab) if vocab.name.endswith("_unseen_only") else None
        table = {}
        for ref in adapter.list_items():
            record = adapter.load(ref)
            label = record.label.astype(np.int64)
            table[digest(record.image)] = label if lut is None else lut[np.minimum(label, len(lut) - 1)]
        return Oracle(method.name, vocab.num_classes, table)

    monkeypatch.setitem(predictors.PREDICTOR_BUILDERS, "oracle", build_oracle)
    monkeypatch.setitem(predictors.PREDICTOR_BUILDERS, "close_call",
                        lambda method, vocab, upstream, device: CloseCall(method.name, vocab.num_classes))
    monkeypatch.setitem(predictors.PREDICTOR_BUILDERS, "colour",
                        lambda method, vocab, upstream, device: ColourModel(method.name, vocab.num_classes))


def make_stage(tmp_path: Path, config: dict, upstream: dict | None = None, name: str = "run") -> EvalStage:
    context = StageContext(node="evaluate", seed=0, config=config, upstream=upstream or {},
                           output_url=str(tmp_path / "evaluate" / name))
    return EvalStage(context)


def run_stage(stage: EvalStage) -> tuple[list, dict]:
    """What the local executor and runner do: setup, every shard committed, finalize."""
    stage.setup()
    done = [run_shard(stage, plan, batch_size=2) for plan in stage.plan()]
    return done, stage.finalize(done)


def read_metrics(stage: EvalStage) -> dict:
    return json.loads((Path(stage.context.output_url) / "metrics.json").read_text())


def toy_config(**overrides) -> dict:
    config = {"vocab": "toy", "data": TOY_DATA, "protocol": "ifseg", "protocol_overrides": {"short_side": 64},
              "methods": [{"name": "oracle", "kind": "oracle"}], "samples_per_shard": 2}
    return {**config, **overrides}


def test_oracle_scores_100_on_real_camvid_images(tmp_path, shared_data, oracle_kind, monkeypatch):
    data = {"kind": "camvid", "root": str(shared_data / "camvid"), "split": "val"}
    monkeypatch.setitem(ORACLE_DATA, "oracle", data)
    # CamVid is 480x360: short side 360 makes the protocol's resize an identity, so GT fed back is exact
    config = {"vocab": "camvid_11", "data": data, "protocol_overrides": {"short_side": 360},
              "methods": [{"name": "oracle", "kind": "oracle"}], "max_images": 10,
              "samples_per_shard": 4, "num_report_samples": 2}
    stage = make_stage(tmp_path, config)
    done, extra = run_stage(stage)
    assert [d.count for d in done] == [4, 4, 2] and sum(d.failed for d in done) == 0
    metrics = read_metrics(stage)["methods"]["oracle"]
    assert metrics["mIoU"] == pytest.approx(100.0) and metrics["pAcc"] == pytest.approx(100.0)
    assert metrics["num_pixels"] > 0.9 * 10 * 480 * 360  # void (raw 11) pixels are the only ones left out
    assert "mIoU(S)" not in metrics  # camvid_11 has no unseen classes
    assert metrics["protocol"]["short_side"] == 360 and metrics["protocol"]["name"] == "ifseg"
    assert metrics["protocol"]["knn_postprocess"] is False
    assert extra["metrics"]["oracle"]["mIoU"] == pytest.approx(100.0)


def expected_colour_matrix(num_images: int, protocol_overrides: dict) -> ConfusionMatrix:
    adapter = build_adapter(TOY_DATA)
    protocol = load_protocol("ifseg")
    for key, value in protocol_overrides.items():
        setattr(protocol, key, value)
    vocab = load_vocab("toy")
    model, matrix = ColourModel("colour", vocab.num_classes), ConfusionMatrix(vocab.num_classes)
    for ref in adapter.list_items()[:num_images]:
        record = adapter.load(ref)
        matrix.update(predict(record.image, model.logits, protocol, vocab.num_classes, vocab.seen_ids), record.label)
    return matrix


def test_per_shard_matrices_merge_to_the_single_pass_numbers(tmp_path, oracle_kind):
    methods = [{"name": "colour", "kind": "colour", "protocol_overrides": {"mode": "slide", "crop": 48,
                                                                           "stride": 32}}]
    sharded = make_stage(tmp_path, toy_config(methods=methods, samples_per_shard=2), name="sharded")
    whole = make_stage(tmp_path, toy_config(methods=methods, samples_per_shard=5), name="whole")
    done_sharded, _ = run_stage(sharded)
    done_whole, _ = run_stage(whole)
    assert (len(done_sharded), len(done_whole)) == (3, 1)
    a, b = read_metrics(sharded)["methods"]["colour"], read_metrics(whole)["methods"]["colour"]
    expected = compute_metrics(expected_colour_matrix(5, {"short_side": 64, "mode": "slide", "crop": 48,
                                                          "stride": 32}),
                               load_vocab("toy").names, unseen_ids=load_vocab("toy").unseen_ids)
    for key in ("mIoU", "pAcc", "mIoU(S)", "mIoU(U)", "hIoU", "num_pixels"):
        assert a[key] == b[key] == pytest.approx(expected[key])
    assert 0.0 < a["mIoU"] < 100.0
    assert a["seen_ids"] == [0, 1, 2, 3, 4, 6, 7, 8, 11] and a["unseen_ids"] == [5, 9, 10]


def test_background_words_are_scored_and_folded_into_the_background_class(tmp_path, oracle_kind):
    overrides = {"short_side": 64, "background": "stuff_names"}
    config = toy_config(methods=[{"name": "colour", "kind": "colour"}], protocol_overrides=overrides,
                        background_words=["cloud", "sun"], background_class="sky", seen_ids_from_vocab=False)
    stage = make_stage(tmp_path, config)
    assert stage.predict_vocab.names[-3:] == ("ball", "cloud", "sun") and stage.background_id == 0
    run_stage(stage)
    adapter, protocol = build_adapter(TOY_DATA), load_protocol("ifseg")
    protocol.short_side = 64
    model, matrix, raw_ids = ColourModel("colour", 14), ConfusionMatrix(12), set()
    for ref in adapter.list_items():
        record = adapter.load(ref)
        raw = predict(record.image, model.logits, protocol, 14)
        raw_ids |= set(np.unique(raw).tolist())
        matrix.update(np.where(raw >= 12, 0, raw), record.label)
    assert raw_ids & {12, 13}  # the extra words do win pixels, so folding matters
    expected = compute_metrics(matrix, load_vocab("toy").names)
    metrics = read_metrics(stage)
    assert metrics["methods"]["colour"]["mIoU"] == pytest.approx(expected["mIoU"])
    assert metrics["methods"]["colour"]["per_class_iou"]["sky"] == pytest.approx(expected["per_class_iou"]["sky"])
    assert metrics["background_words"] == ["cloud", "sun"]


@pytest.mark.parametrize("penalise, winner", [(True, 5), (False, 0)])
def test_zegclip_seen_penalty_lowers_the_seen_classes_of_the_vocabulary(tmp_path, oracle_kind, penalise, winner):
    # sigmoid: sky 0.5498 - 0.1 < tree 0.5250 > 0.5 (dog, boat, unpenalised) when seen classes are penalised
    methods = [{"name": "close", "kind": "close_call", "protocol": "zegclip"}]
    stage = make_stage(tmp_path, toy_config(methods=methods, seen_ids_from_vocab=penalise, max_images=1))
    run_stage(stage)
    sample = next(iter(iter_tar_samples(str(Path(stage.context.output_url) / "000000.tar"))))
    assert np.unique(read_label_png(sample["close.png"])).tolist() == [winner]


@pytest.mark.parametrize("model_penalty, overrides, winner, used, source", [
    (0.0, {}, 0, 0.0, "model"),          # transductive ZegCLIP under the zegclip preset (0.1): the model's 0.0 wins
    (0.1, {}, 5, 0.1, "model"),          # inductive: 0.1 flips sky (0.5498 - 0.1) below tree (0.5250)
    (None, {}, 5, 0.1, "protocol"),      # a model without a penalty of its own: the preset's
    (0.0, {"seen_penalty": 0.1}, 5, 0.1, "override"),  # an explicit override is an ablation and wins
])
def test_seen_penalty_is_the_trained_models_own(tmp_path, monkeypatch, model_penalty, overrides, winner, used,
                                                source):
    def build(method, vocab, upstream, device):
        model = CloseCall(method.name, vocab.num_classes)
        if model_penalty is not None:
            model.seen_penalty = model_penalty
        return model

    monkeypatch.setitem(predictors.PREDICTOR_BUILDERS, "close_model", build)
    methods = [{"name": "close", "kind": "close_model", "protocol": "zegclip", "protocol_overrides": overrides}]
    stage = make_stage(tmp_path, toy_config(methods=methods, max_images=1))
    run_stage(stage)
    sample = next(iter(iter_tar_samples(str(Path(stage.context.output_url) / "000000.tar"))))
    assert np.unique(read_label_png(sample["close.png"])).tolist() == [winner]
    record = read_metrics(stage)["methods"]["close"]
    assert record["protocol"]["seen_penalty"] == used and record["seen_penalty_source"] == source


def test_unseen_only_lut_keeps_unseen_classes_in_vocab_order():
    vocab = load_vocab("toy")  # unseen: tree 5, dog 9, boat 10
    label = np.array([[5, 9, 10, 0], [11, 255, 7, 5]])
    lut = unseen_only_lut(vocab)
    assert lut[label].tolist() == [[0, 1, 2, 255], [255, 255, 255, 0]]


def test_unseen_only_scores_unseen_gt_pixels_with_the_unseen_words(tmp_path, oracle_kind):
    constant = {"name": "tree", "kind": "colour", "protocol_overrides": {"short_side": 64}}
    methods = [{"name": "oracle", "kind": "oracle"}, constant]
    stage = make_stage(tmp_path, toy_config(methods=methods, gt_filter="unseen_only"))
    assert stage.eval_vocab.names == ("tree", "dog", "boat") and stage.eval_vocab.unseen_ids == (0, 1, 2)
    run_stage(stage)
    metrics = read_metrics(stage)
    assert metrics["vocab"] == "toy_unseen_only" and metrics["gt_filter"] == "unseen_only"
    oracle = metrics["methods"]["oracle"]
    adapter, vocab = build_adapter(TOY_DATA), load_vocab("toy")
    labels = [adapter.load(ref).label for ref in adapter.list_items()]
    unseen_pixels = sum(int(np.isin(label, vocab.unseen_ids).sum()) for label in labels)
    assert oracle["num_pixels"] == unseen_pixels > 0 and oracle["mIoU"] == pytest.approx(100.0)
    assert set(oracle["per_class_iou"]) == {"tree", "dog", "boat"} and "mIoU(U)" not in oracle


def write_upstream_labels(directory: Path, labels: dict[str, np.ndarray], vocab: str = "toy") -> StageOutput:
    """A finished pseudolabel-like stage output (2 samples per shard) holding `label.png` per key."""
    import fsspec

    fs, items = fsspec.filesystem("file"), list(labels.items())
    samples = [SampleOutput(key, {"label.png": encode_label_png(label.astype(np.uint8)), "json": b"{}"})
               for key, label in items]
    done = [commit_shard(fs, str(directory), i, samples[start:start + 2], "fp")
            for i, start in enumerate(range(0, len(samples), 2))]
    manifest = {"fingerprint": "fp", "shards": [{"name": f"{d.shard}.tar"} for d in done],
                "num_samples": len(samples), "num_failed": 0, "vocab": load_vocab(vocab).to_dict()}
    write_stage_index(fs, str(directory), manifest, done)
    return StageOutput(str(directory))


def labels_stage(tmp_path: Path, upstream: StageOutput, **overrides) -> EvalStage:
    config = toy_config(inputs={"pseudo": "pseudolabel"},
                        methods=[{"name": "pseudo", "kind": "labels", "input": "pseudo"}], **overrides)
    return make_stage(tmp_path, config, upstream={"pseudo": upstream})


def test_labels_method_scores_labelled_pixels_and_reports_coverage_and_missing(tmp_path):
    adapter = build_adapter(TOY_DATA)
    labels, labelled, valid = {}, 0, 0
    for ref in adapter.list_items()[:4]:  # the 5th image has no pseudo-label upstream
        label = adapter.load(ref).label.copy()
        valid += int((label != 255).sum())
        label[: label.shape[0] // 2] = 255  # top half unlabelled; the rest exactly right
        labelled += int((label != 255).sum())
        labels[ref.key] = label
    stage = labels_stage(tmp_path, write_upstream_labels(tmp_path / "pseudolabel" / "fp", labels))
    _, extra = run_stage(stage)
    metrics = read_metrics(stage)["methods"]["pseudo"]
    assert metrics["mIoU"] == pytest.approx(100.0) and metrics["num_pixels"] == labelled
    assert metrics["coverage"] == pytest.approx(100.0 * labelled / valid) and metrics["missing_samples"] == 1
    assert extra["metrics"]["pseudo"]["missing_samples"] == 1


def test_labels_made_with_another_vocabulary_are_refused_before_any_work(tmp_path):
    adapter = build_adapter(TOY_DATA)
    ref = adapter.list_items()[0]
    upstream = write_upstream_labels(tmp_path / "pseudolabel" / "fp", {ref.key: adapter.load(ref).label}, "camvid_11")
    with pytest.raises(ConfigError, match="labels use vocabulary 'camvid_11', not 'toy'"):
        labels_stage(tmp_path, upstream).plan()


def test_a_bad_sample_fails_alone_and_is_never_counted_twice(tmp_path):
    adapter = build_adapter(TOY_DATA)
    first, second = (adapter.load(ref) for ref in adapter.list_items()[:2])
    broken = second.label.copy()
    broken[0, 0] = 200  # not a toy class
    upstream = write_upstream_labels(tmp_path / "pseudolabel" / "fp", {first.key: first.label, second.key: broken})
    stage = labels_stage(tmp_path, upstream, max_images=2)
    done, _ = run_stage(stage)  # batch size 2: both images in one process_batch call
    assert [(d.count, d.failed) for d in done] == [(1, 1)]
    assert read_metrics(stage)["methods"]["pseudo"]["num_pixels"] == int((first.label != 255).sum())
    rows = pq.read_table(Path(stage.context.output_url) / "000000.parquet").to_pylist()
    assert rows[1]["status"] == "failed" and "[200] outside the 12 eval classes" in rows[1]["error"]


def test_report_and_metrics_files(tmp_path, oracle_kind):
    methods = [{"name": "oracle", "kind": "oracle"}, {"name": "colour", "kind": "colour"}]
    stage = make_stage(tmp_path, toy_config(methods=methods, num_report_samples=3))
    run_stage(stage)
    out = Path(stage.context.output_url)
    document = json.loads((out / "metrics.json").read_text())  # strict JSON (NaN -> null)
    assert document["num_images"] == 5 and set(document["methods"]) == {"oracle", "colour"}
    report = (out / "report" / "report.md").read_text()
    assert "| oracle | 100.00 | 100.00 |" in report and "## Per-class IoU (%)" in report
    assert sorted(p.name for p in (out / "report" / "samples").iterdir()) == [
        "toy_val_000000.png", "toy_val_000001.png", "toy_val_000002.png"]
    assert (out / "report" / "legend.png").stat().st_size > 0
    tar_names = sorted(p.name for p in out.glob("*.tar"))
    assert tar_names == ["000000.tar", "000001.tar", "000002.tar"]


@pytest.mark.parametrize("change, match", [
    ({"methods": [{"name": "m", "kind": "maskclip", "colour": 1}]},
     r"evaluate\.methods\[0\]\.colour: unknown config key;"),
    ({"methods": [{"name": "m", "kind": "trained", "input": "x", "knnn": True}]},
     r"evaluate\.methods\[0\]\.knnn: unknown config key;"),
    ({"methods": [{"name": "m", "kind": "maskclip", "clip": {"pretraind": "x"}}]},
     r"evaluate\.methods\[0\]\.clip\.pretraind: unknown config key;"),
    ({"methods": [{"name": "m", "kind": "maskclip", "templates": "nope"}]}, r"evaluate\.methods\[0\]\.templates"),
    ({"methods": [{"name": "m", "kind": "maskclip", "logit_scale": "big"}]},
     r"evaluate\.methods\[0\]\.logit_scale='big': expected float"),
    ({"methods": [{"name": "m", "kind": "labels", "input": "pseudo"}]}, r"methods\[0\]\.input='pseudo'"),
    ({"methods": [{"name": "m", "kind": "labels", "input": "pseudo", "knn": True}], "inputs": {"pseudo": "p"}},
     "K-NN post-processing"),
    ({"methods": [{"name": "m.png", "kind": "maskclip"}]}, r"methods\[0\]\.name"),
    ({"methods": [{"name": "m", "kind": "mystery"}]}, r"kind='mystery'"),
    ({"protocol_overrides": {"crop_size": 3}}, r"unknown protocol key\(s\) \['crop_size'\]"),
    ({"protocol": "nope"}, "known presets"),
    ({"vocab": "camvid_11"}, r"evaluate\.data: toyworld .* set vocab=toy"),
    ({"vocab": "camvid_11", "data": {**TOY_DATA, "vocab": "toy"}}, r"set evaluate\.vocab=toy"),
    ({"gt_filter": "seen_only"}, "gt_filter"),
    ({"background_words": ["cloud"]}, "protocol_overrides.background=stuff_names"),
    ({"protocol_overrides": {"background": "stuff_names"}}, "background_words is empty"),
    ({"background_words": ["cloud"], "protocol_overrides": {"background": "stuff_names"}}, "background_class"),
    ({"background_words": ["sky"], "background_class": "sky", "protocol_overrides": {"background": "stuff_names"}},
     "duplicate class names"),
])
def test_config_errors_name_the_key_before_any_work(tmp_path, oracle_kind, change, match):
    with pytest.raises(ConfigError, match=match):
        make_stage(tmp_path, {**toy_config(), **change})


@pytest.mark.parametrize("overrides, match", [
    ({"stride": 999}, r"evaluate\.methods\[0\]\.protocol: protocol\.stride must satisfy"),
    ({"mode": "tiles"}, r"evaluate\.methods\[0\]\.protocol\.mode='tiles': expected one of \['whole', 'slide'\]"),
])
def test_invalid_protocol_values_fail_on_the_driver(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_stage(tmp_path, toy_config(methods=[{"name": "m", "kind": "maskclip"}], protocol_overrides=overrides))


def test_unseen_only_needs_a_split(tmp_path, shared_data, oracle_kind):
    data = {"kind": "camvid", "root": str(shared_data / "camvid"), "split": "val"}
    with pytest.raises(ConfigError, match="no unseen classes"):
        make_stage(tmp_path, toy_config(vocab="camvid_11", data=data, gt_filter="unseen_only"))


def test_trained_methods_get_knn_from_the_protocol_unless_they_set_it(tmp_path, monkeypatch):
    calls = []

    def build_trained(method, vocab, upstream, device):
        output = upstream[method.input]
        calls.append((output, vocab.name, device, method.knn))
        return ColourModel(method.name, vocab.num_classes + (1 if output == "wrong" else 0))

    monkeypatch.setitem(predictors.PREDICTOR_BUILDERS, "trained", build_trained)
    methods = [{"name": "ifseg", "kind": "trained", "input": "model"},  # ifseg preset: knn_postprocess true
               {"name": "ifseg_plus", "kind": "trained", "input": "model", "knn": False},
               {"name": "zegclip", "kind": "trained", "input": "model", "protocol": "zegclip"}]
    config = toy_config(inputs={"model": "train_ifseg"}, methods=methods, device="cpu")
    stage = make_stage(tmp_path, config, upstream={"model": "output"})
    assert [spec.protocol.knn_postprocess for spec in stage.methods] == [True, False, False]
    assert [spec.record()["protocol"]["knn_postprocess"] for spec in stage.methods] == [True, False, False]
    stage.setup()
    assert calls == [("output", "toy", "cpu", True), ("output", "toy", "cpu", False), ("output", "toy", "cpu", False)]
    wrong = make_stage(tmp_path, config, upstream={"model": "wrong"})
    with pytest.raises(ValueError, match="'ifseg': the model predicts 13 classes, the vocabulary 'toy' has 12"):
        wrong.setup()


def test_maskclip_knn_only_when_asked_and_the_protocol_records_what_the_predictor_applied(tmp_path, monkeypatch):
    built = []

    def build_maskclip(method, vocab, upstream, device):
        model = ColourModel(method.name, vocab.num_classes)
        model.knn = bool(method.knn)
        built.append((method.name, method.knn))
        return model

    def build_trained(method, vocab, upstream, device):  # a trained model that is not IFSeg ignores the request
        model = ColourModel(method.name, vocab.num_classes)
        model.knn = False
        return model

    monkeypatch.setitem(predictors.PREDICTOR_BUILDERS, "maskclip", build_maskclip)
    monkeypatch.setitem(predictors.PREDICTOR_BUILDERS, "trained", build_trained)
    methods = [{"name": "maskclip", "kind": "maskclip"},  # ifseg preset's knn_postprocess is for trained models
               {"name": "maskclip_knn", "kind": "maskclip", "knn": True},
               {"name": "align", "kind": "trained", "input": "model"}]
    stage = make_stage(tmp_path, toy_config(inputs={"model": "m"}, methods=methods, max_images=1),
                       upstream={"model": "output"})
    assert [spec.entry.knn for spec in stage.methods] == [False, True, True]
    run_stage(stage)
    assert built == [("maskclip", False), ("maskclip_knn", True)]
    recorded = read_metrics(stage)["methods"]
    assert [recorded[name]["protocol"]["knn_postprocess"] for name in ("maskclip", "maskclip_knn", "align")] == [
        False, True, False]
