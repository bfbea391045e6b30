"""The whole demo DAG end to end on a reduced toy world (executor=local), then an up-to-date re-run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.run import compose, run
from pipeline.shards import open_stage

pytestmark = pytest.mark.slow

REDUCED = [
    "toy.train_images=6", "toy.val_images=4", "toy.size=64",
    "wordgrid.num_samples=200", "wordgrid.samples_per_shard=100",
    "train_ifseg.loop.steps=3", "train_ifseg_st.loop.steps=2", "train_align.loop.steps=2",
    "train_zegclip.loop.steps=2", "train_zegclip_st.loop.steps=2",
    "train_ifseg_st.image_size=64", "train_align.image_size=56",
    "selftrain.samples_per_shard=3", "pseudolabel.samples_per_shard=3", "eval.samples_per_shard=2",
    "pseudolabel.amg.points_per_side=4",
]


def test_demo_dag_end_to_end(tmp_path: Path):
    summaries = run(compose("demo", [f"output_root={tmp_path}", "executor=local", *REDUCED]))
    assert [s.node for s in summaries] == ["wordgrid", "train_ifseg", "selftrain", "train_ifseg_st", "pseudolabel",
                                           "train_align", "train_zegclip", "train_zegclip_st", "eval"]
    assert all(s.status == "ran" and s.failed == 0 for s in summaries)
    metrics = json.loads(Path(open_stage(str(tmp_path / "eval")).path, "metrics.json").read_text())
    methods = metrics["methods"] if "methods" in metrics else metrics
    expected = {"maskclip", "ifseg", "ifseg_knn", "ifseg_selftrain", "align", "zegclip", "zegclip_transductive"}
    assert expected <= set(methods)
    for name in expected:
        assert 0.0 <= methods[name]["pAcc"] <= 100.0 and not math.isnan(methods[name]["pAcc"])
    assert (Path(open_stage(str(tmp_path / "eval")).path) / "report" / "report.md").exists()
    quality = open_stage(str(tmp_path / "pseudolabel")).manifest["quality"]
    assert quality["merge_policy"] == "stage11_first"
    s11, s12, merged = (quality[name] for name in ("stage11", "stage12", "merged"))
    valid = merged["num_valid_pixels"]
    assert s11["num_valid_pixels"] == s12["num_valid_pixels"] == valid == 6 * 64 * 64  # every toy-train GT pixel
    # stage11_first labels the union of both producers' pixels: at least either, at most both
    labelled = [m["num_labelled_pixels"] for m in (s11, s12, merged)]
    assert max(labelled[:2]) <= labelled[2] <= min(labelled[0] + labelled[1], valid)
    assert merged["coverage"] == pytest.approx(100.0 * labelled[2] / valid)
    again = run(compose("demo", [f"output_root={tmp_path}", "executor=local", *REDUCED]))
    assert {s.status for s in again} == {"up to date"}
