"""Incremental re-runs, measured side by side in one run: input-identity cost, a pseudolabel re-run after adding 1 %
new images (appended in key order, and interleaved) vs the full run, and a no-op re-run of the whole demo DAG.

    python scripts/bench_incremental.py [--files 10000] [--file-kb 32] [--images 100] [--per-shard 8] [--demo-root DIR]

Prints a table, then one JSON object on the last line. `--demo-root` reuses a finished run of the reduced demo
(DEMO below); without it the script makes one first (minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.data.folder import FolderAdapter
from pipeline.data.toyworld import render_scene, split_seed
from pipeline.run import compose, run

DEMO = ["toy.train_images=6", "toy.val_images=4", "toy.size=64", "wordgrid.num_samples=200",
        "wordgrid.samples_per_shard=100", "train_ifseg.loop.steps=3", "train_ifseg_st.loop.steps=2",
        "train_align.loop.steps=2", "train_zegclip.loop.steps=2", "train_zegclip_st.loop.steps=2",
        "train_ifseg_st.image_size=64", "train_align.image_size=56", "selftrain.samples_per_shard=3",
        "pseudolabel.samples_per_shard=3", "eval.samples_per_shard=2", "pseudolabel.amg.points_per_side=4"]


def identity_cost(folder: Path, files: int, kilobytes: int) -> dict[str, float]:
    """The folder adapter's input identity (one listing) vs sha256 of every file's bytes (content hashing)."""
    folder.mkdir()
    body = bytes(range(256)) * (kilobytes * 4)
    for i in range(files):
        (folder / f"f{i:06d}.png").write_bytes(body)
    listing = min([_timed(lambda: FolderAdapter(str(folder), vocab="toy").input_identity()) for _ in range(3)])
    hashing = min([_timed(lambda: [hashlib.sha256(p.read_bytes()).digest() for p in folder.iterdir()])
                    for _ in range(3)])
    return {"identity_s_per_10k": listing * 1e4 / files, "content_hash_s_per_10k": hashing * 1e4 / files}


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def add_images(folder: Path, names: list[str], offset: int) -> None:
    for i, name in enumerate(names):
        Image.fromarray(render_scene(split_seed("train", offset + i), 64).image).save(folder / f"{name}.png")


def pseudolabel_rerun(work: Path, images: int, per_shard: int) -> dict[str, float]:
    """Full run on `images` toy scenes in a folder, then + 1 % named to sort last, then + 1 % between old keys."""
    folder, new = work / "pool", max(1, images // 100)
    folder.mkdir()
    add_images(folder, [f"im{i:05d}" for i in range(images)], 0)
    cfg = [f"output_root={work / 'out'}", "executor=local", "stages=[pseudolabel]", "vocab=toy",
           f"pseudolabel.data={{kind:folder,root:{folder}}}", f"pseudolabel.samples_per_shard={per_shard}",
           "pseudolabel.image_short_side=64", "pseudolabel.amg.points_per_side=4", "pseudolabel.resources.batch_size=4"]
    result = {}
    for label, names in (("full", []), ("append", [f"zz{i:03d}" for i in range(new)]),
                         ("interleave", [f"im{i * images // new:05d}x" for i in range(new)])):
        add_images(folder, names, images + len(result) * new)
        started = time.perf_counter()
        [summary] = run(compose("demo", cfg))
        result[f"{label}_s"] = time.perf_counter() - started
        result[f"{label}_computed"] = summary.samples - summary.reused
    return result


def noop_demo(root: Path) -> dict[str, float]:
    """Wall time of an up-to-date `python -m pipeline.run` of the reduced demo, the time inside `run`, and the cost
    of `import torch` alone (the stage modules import it today)."""
    command = [sys.executable, "-m", "pipeline.run", f"output_root={root}", "executor=local", *DEMO]
    if not (root / "eval" / "current.json").exists():
        subprocess.run(command, check=True, capture_output=True)
    walls, inside = [], []
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        walls.append(time.perf_counter() - started)
        inside.append(float(re.search(r"stage\(s\) in ([\d.]+) s", done).group(1)))
    torch = min([_timed(lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True))
                  for _ in range(3)])
    return {"noop_wall_s": min(walls), "noop_in_run_s": min(inside), "import_torch_s": torch}


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag, default in (("--files", 10000), ("--file-kb", 32), ("--images", 100), ("--per-shard", 8)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--demo-root", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = identity_cost(Path(tmp) / "files", args.files, args.file_kb)
        result |= pseudolabel_rerun(Path(tmp), args.images, args.per_shard)
        result |= noop_demo(args.demo_root or Path(tmp) / "demo")
    result |= {"append_over_full": result["append_s"] / result["full_s"],
               "interleave_over_full": result["interleave_s"] / result["full_s"]}
    for key, value in result.items():
        print(f"{key:<24} {value:10.3f}")
    print(json.dumps({key: round(value, 4) for key, value in result.items()}))


if __name__ == "__main__":
    main()
