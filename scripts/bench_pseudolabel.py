"""CLIP + SAM pseudo-labels: bare model cost vs a per-image loop vs this stage, side by side in one run.

Same images, same models, same knobs in all three:

(a) Bare model cost: only the networks, on pre-decoded, pre-transformed batches: CLIP on every sliding-window
    crop, SAM's image encoder, SAM's prompt encoder + mask decoder on the automatic generator's point grid and on
    the stage 1.1 prompt sets (low-resolution logits, no post-processing). A lower bound on any implementation.
(b) Per-image loop, the way SAM's ``scripts/amg.py`` and autodistill-style labelers do it: for each image decode it,
    run CLIP's sliding window on it alone, ``SamPredictor.set_image`` then one ``predict`` call per present class,
    ``SamAutomaticMaskGenerator.generate`` (which encodes the image again), label each mask, write the label PNG,
    masks JSON and image to a folder.
(c) This stage: ``run_shard`` over its shard plans (models loaded once, decoding prefetched, crops of a batch of
    images sharing CLIP calls, one SAM encoding per image reused by the generator), committed WebDataset shards.

Prints images/s for each and the ratios (c)/(a) ("efficiency": how close the stage gets to the bare networks) and
(c)/(b) ("speed-up" over the per-image loop). Defaults are the CPU toy models; on a GPU pass e.g.
``--clip ViT-B-16 --sam vit_h --device cuda --short-side 448``.

    python scripts/bench_pseudolabel.py [--images 16] [--data camvid|toyworld] [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.executor import run_shard
from pipeline.models.sliding import short_side_scale
from pipeline.sample_files import encode_image, encode_label_png, mask_record, mask_to_rle, rle_to_mask
from pipeline.stage import StageContext
from stages.pseudolabel import PseudoLabelStage
from stages.pseudolabel.steps import (
    LabelledMask,
    keep_automatic_mask,
    label_masks_by_dense_features,
    merge,
    patch_similarity,
    point_prompts,
    present_classes,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def build_stage(args: argparse.Namespace, out_dir: str) -> PseudoLabelStage:
    if args.data == "camvid":
        data = {"kind": "folder", "root": str(SHARED / "camvid" / "train")}
        vocab = "camvid_11"
    else:
        data, vocab = {"kind": "toyworld", "split": "train", "num_images": args.images, "size": 256}, "toy"
    config = {
        "vocab": vocab, "data": data, "samples_per_shard": args.images, "image_short_side": args.short_side,
        "clip": {"model_name": args.clip, "device": args.device}, "crop": args.crop, "stride": args.stride,
        "sam": {"model_type": args.sam, "device": args.device, "encoder_batch_size": args.batch},
        "min_crops": 0, "min_mask_area": 1, "min_predicted_iou": 0.0,
        "amg": {"points_per_side": args.points, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
    }
    stage = PseudoLabelStage(StageContext("pseudolabel", 0, config, output_url=out_dir))
    stage.setup()
    return stage


class Timer:
    """Wall-clock and process CPU seconds of a block (CUDA synchronised at both ends when on a GPU).

    CPU seconds (all threads of this process) are reported too because wall time on a shared CPU machine moves
    with other users' load; on a dedicated GPU machine wall time is the number to quote.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Timer:
        self._sync()
        self.wall, self.cpu = -time.perf_counter(), -time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.wall += time.perf_counter()
        self.cpu += time.process_time()

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def bare_models(stage: PseudoLabelStage, images: list[np.ndarray], args: argparse.Namespace) -> Timer:
    """(a): the networks alone on pre-built inputs."""
    clip, sam = stage.clip, stage.sam
    canvases = [clip.prepare_canvas(image, stage.crop, stage.stride,
                                    short_side_scale(image.shape[:2], stage.cfg.image_short_side)) for image in images]
    crops = torch.cat([c.pixels[:, :, y0:y1, x0:x1] for c in canvases for x0, y0, x1, y1 in c.boxes])
    sam_inputs = [sam.model.preprocess(torch.as_tensor(sam.transform.apply_image(image), device=sam.device)
                                       .permute(2, 0, 1)[None].float()) for image in images]
    grid = sam.transform.apply_coords(np.stack(np.meshgrid(*(np.linspace(8, 248, args.points),) * 2), -1)
                                      .reshape(-1, 1, 2), (256, 256))
    points = torch.as_tensor(grid, dtype=torch.float32, device=sam.device)
    sets = torch.as_tensor(np.repeat(grid[:5].reshape(1, 5, 2), 5, 0), dtype=torch.float32, device=sam.device)
    with Timer(args.device) as timer, torch.no_grad():
        for start in range(0, len(crops), clip.cfg.image_batch_size):
            clip.dense_features(crops[start:start + clip.cfg.image_batch_size].to(clip.device))
        for start in range(0, len(images), args.batch):
            features = sam.model.image_encoder(torch.cat(sam_inputs[start:start + args.batch]))
            for index in range(features.shape[0]):
                for prompts in [*points.split(64), sets]:
                    labels = torch.ones(prompts.shape[:2], dtype=torch.int64, device=sam.device)
                    sparse, dense = sam.model.prompt_encoder(points=(prompts, labels), boxes=None, masks=None)
                    sam.model.mask_decoder(image_embeddings=features[index:index + 1],
                                           image_pe=sam.model.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=True)
    return timer


def per_image_loop(stage: PseudoLabelStage, refs: list, out_dir: Path, args: argparse.Namespace) -> Timer:
    """(b): the per-image loop (decode, CLIP, SamPredictor, AMG, label, write files)."""
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    predictor = SamPredictor(stage.sam.model)
    generator = SamAutomaticMaskGenerator(stage.sam.model, output_mode="coco_rle", **vars(stage.cfg.amg))
    out_dir.mkdir(parents=True, exist_ok=True)
    with Timer(args.device) as timer:
        for ref in refs:
            loop_one(stage, ref, predictor, generator, out_dir)
    return timer


def loop_one(stage: PseudoLabelStage, ref: Any, predictor: Any, generator: Any, out_dir: Path) -> None:
    """One image of (b), written as separate files."""
    cfg, text = stage.cfg, stage.text.cpu().numpy()
    image = stage.adapter.load(ref).image
    feats = stage.clip.sliding_dense(image, stage.crop, stage.stride, short_side_scale(image.shape[:2],
                                                                                       cfg.image_short_side))
    features = feats.features.cpu().numpy()
    present = present_classes(feats.crop_cls.cpu().numpy(), text, cfg.min_crops)
    sim = patch_similarity(text[present], features)
    predictor.set_image(image)
    stage11 = []
    for class_id, points in zip(present, point_prompts(sim, cfg.top_k, feats.centers(), image.shape[:2])):
        masks, scores, _ = predictor.predict(points, np.ones(len(points)), multimask_output=True)
        stage11.append(LabelledMask(masks[scores.argmax()], int(class_id), float(scores.max()), "stage11"))
    records = [r for r in generator.generate(image) if keep_automatic_mask(r, 1, 0.0)]
    stage12 = []
    for record in records:  # one mask at a time, as a per-image labeler does
        mask = rle_to_mask(record["segmentation"])
        ids, _ = label_masks_by_dense_features(mask[None], features, feats.patch_stride_px, text[present], present)
        stage12.append(LabelledMask(mask, int(ids[0]), record["predicted_iou"], "stage12"))
    label = merge(stage11, stage12, image.shape[:2], cfg.merge_policy)
    (out_dir / f"{ref.key}.png").write_bytes(encode_label_png(label))
    (out_dir / f"{ref.key}.jpg").write_bytes(encode_image(image, "jpg"))
    masks_json = [mask_record(mask_to_rle(m.mask), m.category_id, m.score, m.producer) for m in stage11]
    masks_json += [mask_record(r["segmentation"], m.category_id, m.score, m.producer)
                   for r, m in zip(records, stage12, strict=True)]
    (out_dir / f"{ref.key}.json").write_text(json.dumps(masks_json))


def this_stage(stage: PseudoLabelStage, args: argparse.Namespace) -> Timer:
    """(c): the stage's shard runs (prefetch, batching, commit)."""
    with Timer(args.device) as timer:
        for plan in stage.plan():
            run_shard(stage, plan, args.batch)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--data", choices=("camvid", "toyworld"), default="camvid" if SHARED.is_dir() else "toyworld")
    parser.add_argument("--clip", default="toy-vit")
    parser.add_argument("--sam", default="toy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--points", type=int, default=8, help="AMG points_per_side (SAM default 32)")
    parser.add_argument("--short-side", type=int, default=128)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--stride", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best of each is reported")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        stage = build_stage(args, f"{tmp}/stage")
        refs = stage.adapter.list_items()[:args.images]
        stage.adapter.list_items = lambda: refs  # the same images in (b) and (c)
        images = [stage.adapter.load(ref).image for ref in refs]
        this_stage(stage, args)  # warm-up (allocator, lazy inits)
        stage.end_shard()
        runs = {"a": lambda: bare_models(stage, images, args),
                "b": lambda: per_image_loop(stage, refs, Path(tmp) / "loop", args),
                "c": lambda: this_stage(stage, args)}
        timers = {key: [] for key in runs}
        for _ in range(args.repeats):  # interleaved repeats, best of each: robust to other load on the machine
            for key, run in runs.items():
                timers[key].append(run())
    best_wall = {k: min(t.wall for t in v) for k, v in timers.items()}
    best_cpu = {k: min(t.cpu for t in v) for k, v in timers.items()}
    wall = {k: len(refs) / v for k, v in best_wall.items()}
    cpu = {k: len(refs) / v for k, v in best_cpu.items()}
    print(f"{len(refs)} images ({args.data}), CLIP {args.clip}, SAM {args.sam}, {args.device}, batch {args.batch}, "
          f"AMG {args.points}x{args.points} points, short side {args.short_side}, best of {args.repeats}")
    names = {"a": "bare models", "b": "per-image loop", "c": "this stage"}
    for key, name in names.items():
        print(f"({key}) {name:<15} wall {best_wall[key]:8.2f} s {wall[key]:8.2f} images/s   "
              f"cpu {best_cpu[key]:8.2f} s {cpu[key]:8.2f} images/s")
    for label, rate in (("wall", wall), ("cpu", cpu)):
        efficiency, speedup = rate["c"] / rate["a"], rate["c"] / rate["b"]
        print(f"{label}: (c)/(a) efficiency {efficiency:.2f}   (c)/(b) speed-up {speedup:.2f}x")


if __name__ == "__main__":
    main()
