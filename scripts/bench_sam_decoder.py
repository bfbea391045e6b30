"""The SAM decoder's transformer half on the automatic generator's point prompts: `decode_tokens` (segment_anything's
two-way transformer) vs `decode_tokens_shared` (``sam.shared_image_decoder``, `pipeline.models.sam_two_way`).

B single-point prompts on one random image embedding, one torch thread by default; prints the best-of-N thread CPU
milliseconds per call of each path, the speed-up and the max |difference| of the IoUs and mask logits.

    python scripts/bench_sam_decoder.py [--sam toy] [--prompts 64] [--repeats 10]
    python scripts/bench_sam_decoder.py --sam vit_b --repeats 3     # real size: C = 256, 64x64 image tokens
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.models.configs import SamConfig
from pipeline.models.sam import Sam
from pipeline.models.sam_decoder import decode_tokens, decode_tokens_shared, mask_logits

TRAINED_TOY = "assets/models/toy_sam.pt"


def best_ms(call: Callable[[], object], repeats: int) -> float:
    """Best thread-CPU milliseconds of `repeats` calls after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        call()
        times.append(time.thread_time() - start)
    return 1e3 * min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sam", default="toy", help="toy (trained checkpoint when present) or vit_b/vit_l/vit_h")
    parser.add_argument("--prompts", type=int, default=64, help="B (the generator's points_per_batch)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = TRAINED_TOY if args.sam == "toy" and Path(TRAINED_TOY).is_file() else None
    sam = Sam.build(SamConfig(model_type=args.sam, checkpoint=checkpoint, device="cpu"))
    model = sam.model
    grid = model.prompt_encoder.image_embedding_size
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, model.prompt_encoder.embed_dim, *grid, generator=generator)
    coords = torch.rand(args.prompts, 1, 2, generator=generator) * sam.image_size
    labels = torch.ones(args.prompts, 1, dtype=torch.int)
    with torch.no_grad():
        exact, shared = (decode(model, embedding, coords, labels) for decode in (decode_tokens, decode_tokens_shared))
        diff = {"iou": float((exact.iou - shared.iou).abs().max()),
                "logits": float((mask_logits(model, exact) - mask_logits(model, shared)).abs().max())}
        del exact, shared
        ms = {decode.__name__: best_ms(lambda d=decode: d(model, embedding, coords, labels), args.repeats)
              for decode in (decode_tokens, decode_tokens_shared)}
    print(json.dumps({"sam": args.sam, "trained": checkpoint is not None, "prompts": args.prompts,
                      "channels": embedding.shape[1], "grid": list(grid), "threads": args.threads, "ms": ms,
                      "speedup": ms["decode_tokens"] / ms["decode_tokens_shared"], "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
