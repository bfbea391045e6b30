"""scripts/bench_pseudolabel.py end to end on 2 tiny images: its last line is the JSON summary the issue defines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = {"bare_img_s", "loop_img_s", "stage_img_s", "efficiency", "speedup", "device", "clip", "sam", "images"}


def test_the_benchmarks_last_line_is_its_json_summary(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "scripts" / "bench_pseudolabel.py"), "--images", "2", "--size", "48",
               "--points", "2", "--repeats", "1", "--vocab-sizes", "3,20"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert KEYS <= summary.keys()
    assert (summary["images"], summary["device"], summary["clip"], summary["sam"]) == (2, "cpu", "toy-vit", "toy")
    rates = [summary[k] for k in ("bare_img_s", "loop_img_s", "stage_img_s")]
    assert all(rate > 0 for rate in rates)
    assert summary["efficiency"] == summary["stage_img_s"] / summary["bare_img_s"]
    assert summary["speedup"] == summary["stage_img_s"] / summary["loop_img_s"]
    assert set(summary["s_per_image_by_vocab"]) == {"3", "20"}
