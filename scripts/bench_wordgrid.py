"""Word grids: this stage vs IFSeg's own way, side by side in one run.

(a) IFSeg's way (`SegmentationDataset.__getitem__`, rand_k-1-33): per sample torch.randint for (U, V),
    np.random.choice for the cells, torchvision Resize(NEAREST) to 32x32 tokens and 512x512 labels.
(b) This stage: sample the grid, write committed shards (tar + sidecar + done-marker) to disk.
(c) Consumer side of (b): read the shards back and upsample each grid to 32x32 tokens and 512x512 labels.

Bytes/sample: (b) on disk; (a) if its maps were stored (raw uint8 and PNG-compressed).

    python scripts/bench_wordgrid.py [--samples 4000] [--vocab coco_stuff_171]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from pipeline.data.vocab import load_vocab
from pipeline.executor import run_shard
from pipeline.shards import open_stage, write_stage_index
from pipeline.stage import StageContext
from stages.wordgrid import WordGridStage, grid_to_maps


def ifseg_way(n: int, num_classes: int) -> tuple[float, int, int]:
    to32 = transforms.Resize((32, 32), transforms.InterpolationMode.NEAREST)
    to512 = transforms.Resize((512, 512), transforms.InterpolationMode.NEAREST)
    started, png_bytes = time.perf_counter(), 0
    for i in range(n):
        sh, sw = (x.item() for x in torch.randint(1, 33, (2,)))
        rand = torch.from_numpy(np.random.choice(num_classes, size=sh * sw, replace=True)).reshape(1, 1, sh, sw)
        tokens, labels = to32(rand), to512(rand)
        if i < 200:  # storage size estimate on a subset
            buffer = io.BytesIO()
            Image.fromarray(labels[0, 0].numpy().astype(np.uint8)).save(buffer, format="PNG")
            png_bytes += len(buffer.getvalue()) + tokens.numel()
    return n / (time.perf_counter() - started), 512 * 512 + 32 * 32, png_bytes // min(n, 200)


def this_stage(n: int, vocab: str, out_dir: str) -> tuple[float, float, int]:
    config = {"vocab": vocab, "num_samples": n, "samples_per_shard": 1000, "max_grid_size": 32}
    stage = WordGridStage(StageContext("wordgrid", 0, config, output_url=f"{out_dir}/fp0000"))
    started = time.perf_counter()
    done = [run_shard(stage, plan, batch_size=1000) for plan in stage.plan()]
    write_rate = n / (time.perf_counter() - started)
    import fsspec

    write_stage_index(fsspec.filesystem("file"), f"{out_dir}/fp0000", {"fingerprint": "fp0000", "num_samples": n,
                      "num_failed": 0, "shards": [{"name": f"{d.shard}.tar"} for d in done]}, done)
    started = time.perf_counter()
    for sample in open_stage(f"{out_dir}/fp0000").samples():
        grid_to_maps(np.load(io.BytesIO(sample["grid.npy"])))
    read_rate = n / (time.perf_counter() - started)
    return write_rate, read_rate, sum(d.bytes for d in done) // n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--vocab", default="coco_stuff_171")
    args = parser.parse_args()
    torch.set_num_threads(1)
    np.random.seed(0)
    torch.manual_seed(0)
    num_classes = load_vocab(args.vocab).num_classes
    ifseg_rate, raw_bytes, png_bytes = ifseg_way(args.samples, num_classes)
    with tempfile.TemporaryDirectory() as out_dir:
        write_rate, read_rate, shard_bytes = this_stage(args.samples, args.vocab, out_dir)
    print(f"samples={args.samples} vocab={args.vocab} (M={num_classes}), one process, one thread")
    print(f"(a) IFSeg per-sample generation + Resize(NEAREST) 32/512 : {ifseg_rate:9.0f} samples/s")
    print(f"(b) wordgrid stage, committed shards on disk              : {write_rate:9.0f} samples/s")
    print(f"(c) read shards + upsample to 32/512 (consumer side)      : {read_rate:9.0f} samples/s")
    print(f"bytes/sample: shards {shard_bytes} | IFSeg maps raw uint8 {raw_bytes} | as PNG {png_bytes}")
    print(f"ratios: (b)/(a) = {write_rate / ifseg_rate:.2f}  (c)/(a) = {read_rate / ifseg_rate:.2f}  "
          f"storage PNG/shards = {png_bytes / shard_bytes:.1f}x")


if __name__ == "__main__":
    main()
