"""The executor owns counting: a batch with one item that raises is re-run item by item, and every per-shard
counter and quality file then equals a run without that item (no item is folded twice, none is lost)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from selftrain_fixtures import FixedLogitsPredictor

from pipeline.executor import run_shard
from pipeline.predict import predictors
from pipeline.stage import ShardPlan, Stage, StageContext

POISON = "poisoned item"


def poison(monkeypatch: pytest.MonkeyPatch, stage: Stage, method: str, bad_key: str, key_of) -> None:
    """Make `stage.<method>` raise for the item whose key is `bad_key` (after the items before it ran)."""
    original = getattr(stage, method)

    def raising(item, *args, **kwargs):
        if key_of(item) == bad_key:
            raise RuntimeError(POISON)
        return original(item, *args, **kwargs)

    monkeypatch.setattr(stage, method, raising)


def run_both(monkeypatch, make_stage, method: str, key_of) -> tuple[Stage, Stage, object, object]:
    """Shard 0 with the middle item poisoned (one batch) vs the same shard without that item."""
    with_bad, clean = make_stage("with_bad"), make_stage("clean")
    items = with_bad.plan()[0].items
    assert len(items) >= 3
    bad_key = with_bad.item_key(items[1])
    poison(monkeypatch, with_bad, method, bad_key, key_of)
    for stage in (with_bad, clean):
        stage.setup()
    done_bad = run_shard(with_bad, ShardPlan(0, items), batch_size=len(items))
    done_clean = run_shard(clean, ShardPlan(0, tuple(i for i in items if clean.item_key(i) != bad_key)),
                           batch_size=len(items))
    assert done_bad.failed == 1 and done_bad.count == done_clean.count == len(items) - 1
    return with_bad, clean, done_bad, done_clean


def same_json(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def context(tmp_path: Path, node: str, name: str, config: dict, upstream: dict | None = None) -> StageContext:
    out = tmp_path / node / name
    out.mkdir(parents=True)
    return StageContext(node=node, seed=0, config=config, upstream=upstream or {}, output_url=str(out),
                        fingerprint=name)


def test_pseudolabel_counts_each_image_once(tmp_path, monkeypatch):
    from pseudolabel.fixtures import TINY

    from stages.pseudolabel import PseudoLabelStage

    config = {**TINY, "samples_per_shard": 3, "data": {"kind": "toyworld", "num_images": 3, "size": 64}}
    bad, clean, done_bad, done_clean = run_both(
        monkeypatch, lambda name: PseudoLabelStage(context(tmp_path, "pl", name, config)), "_pseudo_label",
        lambda record, *_: record.key)
    assert done_clean.extra["quality"] and same_json(done_bad.extra, done_clean.extra)
    bad.finalize([done_bad]), clean.finalize([done_clean])
    name = "pseudolabel_quality.json"
    assert (Path(bad.context.output_url) / name).read_bytes() == (Path(clean.context.output_url) / name).read_bytes()


def test_selftrain_counts_each_image_once(tmp_path, monkeypatch):
    from stages.selftrain import SelfTrainStage
    from stages.selftrain import stage as selftrain_stage

    predictor = FixedLogitsPredictor([0.0, 1.0, 3.0] + [0.5] * 9)
    monkeypatch.setattr(selftrain_stage, "load_trained", lambda *args: predictor)
    config = {"vocab": "toy", "data": {"kind": "toyworld", "split": "train", "num_images": 4, "size": 32},
              "protocol_overrides": {"short_side": 32}, "policy": "zsseg_st"}
    upstream = {"model": SimpleNamespace(fingerprint="fp-model", manifest={"node": "train_ifseg"})}
    bad, clean, done_bad, done_clean = run_both(
        monkeypatch, lambda name: SelfTrainStage(context(tmp_path, "selftrain", name, config, upstream)), "_sample",
        lambda record: record.key)
    assert done_clean.extra["pixels"]["from_model"] > 0 and "quality" in done_clean.extra
    assert same_json(done_bad.extra, done_clean.extra)
    bad.finalize([done_bad]), clean.finalize([done_clean])
    name = "selftrain_quality.json"
    assert (Path(bad.context.output_url) / name).read_bytes() == (Path(clean.context.output_url) / name).read_bytes()


def test_eval_counts_each_image_once(tmp_path, monkeypatch):
    from test_evaluate import ColourModel

    from stages.evaluate import EvalStage

    monkeypatch.setitem(predictors.PREDICTOR_BUILDERS, "colour",
                        lambda method, vocab, upstream, device: ColourModel(method.name, vocab.num_classes))
    config = {"vocab": "toy", "data": {"kind": "toyworld", "split": "val", "num_images": 4, "size": 48},
              "methods": [{"name": "colour", "kind": "colour"}], "protocol_overrides": {"short_side": 48},
              "num_report_samples": 4}
    bad, clean, done_bad, done_clean = run_both(
        monkeypatch, lambda name: EvalStage(context(tmp_path, "evaluate", name, config)), "_evaluate",
        lambda item: item.ref.key)
    assert same_json(done_bad.extra, done_clean.extra)
    assert len(done_clean.extra["report_keys"]) == 3
    metrics = [json.loads((Path(s.context.output_url) / "metrics.json").read_text())["methods"]
               for s in (bad, clean) if s.finalize([done_bad if s is bad else done_clean]) is not None]
    assert same_json(metrics[0], metrics[1])
