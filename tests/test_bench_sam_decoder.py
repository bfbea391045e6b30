"""scripts/bench_sam_decoder.py on the toy SAM: one JSON line with both paths' times and their max |difference|."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_decoder_benchmark_prints_times_and_a_rounding_level_difference(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "scripts" / "bench_sam_decoder.py"), "--prompts", "5", "--repeats", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["sam"], summary["prompts"], summary["channels"], summary["grid"]) == ("toy", 5, 64, [16, 16])
    assert set(summary["ms"]) == {"decode_tokens", "decode_tokens_shared"} and min(summary["ms"].values()) > 0
    assert summary["speedup"] == summary["ms"]["decode_tokens"] / summary["ms"]["decode_tokens_shared"]
    assert summary["max_abs_diff"]["iou"] < 1e-5 and summary["max_abs_diff"]["logits"] < 1e-4
