"""CLIP + SAM pseudo-labels: bare model cost vs a per-image loop vs this stage, side by side in one run.

Same images (written once to a folder, read back by all three), same models, same knobs:

(a) Bare model cost: only the networks, on pre-decoded, pre-transformed batches: CLIP on every sliding-window
    crop, SAM's image encoder, SAM's prompt encoder + mask decoder on the automatic generator's point grid and on
    stage 1.1-sized prompt sets (the decoder the stage runs: ``sam.shared_image_decoder``,
    `pipeline.models.sam_two_way`, unless ``--exact-decoder``; low-resolution logits, no post-processing, the mask
    head on every prompt).
(b) Per-image loop (always fp32: segment_anything's generator fails under bf16 autocast), the way SAM's
    ``scripts/amg.py`` and autodistill-style labelers do it: for each image decode it,
    run CLIP's sliding window on it alone, ``SamPredictor.set_image`` then one ``predict`` call per present class,
    ``SamAutomaticMaskGenerator.generate`` (which encodes the image again), label each mask, write the label PNG,
    masks JSON and image to a folder.
(c) This stage: ``run_shard`` over its shard plans (models loaded once, decoding prefetched, the batched automatic
    mask post-processing of `pipeline.models.sam_masks`, one SAM encoding per image reused by both producers,
    encoding on a thread), committed WebDataset shards.

Models: by default the toy CLIP and SAM trained on the toy world (``assets/models/toy_*.pt``: realistic masks, the
stage's default AMG thresholds); ``--clip ViT-B-16 --sam vit_b`` (or any other architecture) runs real sizes with
random weights, with permissive thresholds so SAM's post-processing sees many masks. ``--vocab-sizes 12,171,847``
adds the stage's seconds per image for random vocabularies of those sizes; ``--profile`` prints a pyinstrument
profile of one stage run. The last line printed is one JSON object (``bare_img_s``, ``loop_img_s``,
``stage_img_s``, ``efficiency`` = stage/bare, ``speedup`` = stage/loop, ``device``, ``clip``, ``sam``, ``images``,
``precision``, ``s_per_image_by_vocab``). ``--exact-decoder`` runs the stage with ``sam.shared_image_decoder:
false`` (segment_anything's decoder transformer, as (a) and (b) use).

    python scripts/bench_pseudolabel.py [--images 8] [--repeats 2] [--vocab-sizes 12,171,847] [--profile]
    python scripts/bench_pseudolabel.py --clip ViT-B-16 --sam vit_b --short-side 448 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.executor import run_shard
from pipeline.models.precision import autocast
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

REPO = Path(__file__).resolve().parents[1]
TOY_CLIP, TOY_SAM = REPO / "assets" / "models" / "toy_clip.pt", REPO / "assets" / "models" / "toy_sam.pt"
CAMVID = REPO.parent / "shared" / "data" / "camvid" / "train"


def trained_toys(args: argparse.Namespace) -> bool:
    return args.clip == "toy-vit" and args.sam == "toy" and TOY_CLIP.is_file() and TOY_SAM.is_file()


def write_images(args: argparse.Namespace, folder: Path) -> Path:
    """The benchmark's images as PNG files in `folder`: toy-world scenes (default) or CamVid train images."""
    from pipeline.config import checked_adapter, checked_vocab

    folder.mkdir(parents=True)
    if args.data == "camvid":
        paths = sorted(CAMVID.glob("*.png"))[:args.images]
        images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    else:
        data = {"kind": "toyworld", "split": "train", "num_images": args.images, "size": args.size}
        adapter = checked_adapter(data, checked_vocab("toy", "vocab"), "bench")
        images = [adapter.load(ref).image for ref in adapter.list_items()]
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:05d}.png")
    return folder


def random_vocab(size: int, folder: Path) -> str:
    """A YAML vocabulary of `size` random 2-word class names (ADE-847-sized and so on); returns its path."""
    import yaml

    rng = random.Random(size)
    words = {" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(2))
             for _ in range(size * 2)}
    names = sorted(words)[:size]
    path = folder / f"random_{size}.yaml"
    path.write_text(yaml.safe_dump({"name": f"random_{size}", "ignore_index": 255 if size <= 255 else 65535,
                                    "classes": [{"name": name} for name in names]}))
    return str(path)


def build_stage(args: argparse.Namespace, images: Path, out_dir: str, vocab: str | None = None) -> PseudoLabelStage:
    toys = trained_toys(args)
    clip = {"model_name": args.clip, "device": args.device, "precision": args.precision,
            "pretrained": str(TOY_CLIP) if toys else None}
    sam = {"model_type": args.sam, "device": args.device, "precision": args.precision, "encoder_batch_size": args.batch,
           "checkpoint": str(TOY_SAM) if toys else None}
    sam |= {key: True for key in ("sdpa", "channels_last", "compile") if getattr(args, key)}  # SamConfig switches
    sam |= {"shared_image_decoder": False} if args.exact_decoder else {}
    clip |= {"compile": True} if args.compile else {}
    amg: dict[str, Any] = {"points_per_side": args.points}
    config: dict[str, Any] = {"vocab": vocab or ("toy" if args.data == "toyworld" else "camvid_11"),
                              "data": {"kind": "folder", "root": str(images)}, "samples_per_shard": args.images,
                              "image_short_side": args.short_side, "clip": clip, "sam": sam, "crop": args.crop,
                              "stride": args.stride, "amg": amg}
    if args.cross_image_batches:
        config["batch_invariant"] = False
    if toys:
        config |= {"min_mask_area": 20}
    else:  # random weights: permissive thresholds, so the post-processing sees many masks
        config |= {"min_crops": 0, "min_mask_area": 1, "min_predicted_iou": 0.0}
        amg |= {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
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
    """(a): the networks alone on pre-built inputs (the AMG grid and 5 sets of top_k points per image)."""
    from segment_anything.utils.amg import build_all_layer_point_grids

    clip, sam, cfg = stage.clip, stage.sam, stage.cfg
    canvases = [clip.prepare_canvas(image, stage.crop, stage.stride,
                                    short_side_scale(image.shape[:2], cfg.image_short_side)) for image in images]
    crops = torch.cat([c.pixels[:, :, y0:y1, x0:x1] for c in canvases for x0, y0, x1, y1 in c.boxes])
    sam_inputs = [sam.model.preprocess(torch.as_tensor(sam.transform.apply_image(image), device=sam.device)
                                       .permute(2, 0, 1)[None].float()) for image in images]
    grid = build_all_layer_point_grids(cfg.amg.points_per_side, 0, 1)[0]
    prompts = []
    for image in images:
        xy = sam.transform.apply_coords(grid * np.array([[image.shape[1], image.shape[0]]]), image.shape[:2])
        points = torch.as_tensor(xy, dtype=torch.float32, device=sam.device)[:, None]
        sets = points[:cfg.top_k].reshape(1, -1, 2).repeat(5, 1, 1)
        prompts.append([*points.split(cfg.amg.points_per_batch), sets])
    with Timer(args.device) as timer, torch.no_grad(), autocast(sam.device, args.precision):
        for start in range(0, len(crops), clip.cfg.image_batch_size):
            clip.dense_features(crops[start:start + clip.cfg.image_batch_size].to(clip.device))
        for start in range(0, len(images), args.batch):
            features = sam.model.image_encoder(torch.cat(sam_inputs[start:start + args.batch]))
            for index in range(features.shape[0]):
                *grid_batches, sets = prompts[start + index]
                for batch in [*grid_batches, sets]:
                    stage_decoder(sam, features[index:index + 1], batch)
    return timer


def stage_decoder(sam: Any, embedding: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The decoder the stage runs (`Sam.decoder_tokens`: ``sam.shared_image_decoder``, else segment_anything's, bit
    for bit), the mask head on every prompt; multimask low-resolution logits."""
    from pipeline.models.sam_decoder import mask_logits

    labels = torch.ones(points.shape[:2], dtype=torch.int64, device=sam.device)
    return mask_logits(sam.model, sam.decoder_tokens(embedding, points, labels))[:, 1:]


def per_image_loop(stage: PseudoLabelStage, refs: list, out_dir: Path, args: argparse.Namespace) -> Timer:
    """(b): the per-image loop (decode, CLIP, SamPredictor, AMG, label, write files)."""
    from dataclasses import asdict

    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    predictor = SamPredictor(stage.sam.model)
    generator = SamAutomaticMaskGenerator(stage.sam.model, output_mode="coco_rle", **asdict(stage.cfg.amg))
    out_dir.mkdir(parents=True, exist_ok=True)
    with Timer(args.device) as timer, torch.no_grad():  # fp32: segment_anything's generator fails under autocast
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
    stage11, records = [], []
    if present.size:  # as the stage: no present class, no SAM
        sim = patch_similarity(text[present], features)
        predictor.set_image(image)
        for class_id, points in zip(present, point_prompts(sim, cfg.top_k, feats.centers(), image.shape[:2])):
            masks, scores, _ = predictor.predict(points, np.ones(len(points)), multimask_output=True)
            stage11.append(LabelledMask(masks[scores.argmax()], int(class_id), float(scores.max()), "stage11"))
        records = [r for r in generator.generate(image)
                   if keep_automatic_mask(r, max(1, cfg.min_mask_area), cfg.min_predicted_iou)]
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
    stage.end_shard()
    return timer


def vocabulary_cost(args: argparse.Namespace, images: Path, tmp: Path) -> dict[str, float]:
    """The stage's wall seconds per image for random vocabularies of each size in ``--vocab-sizes``."""
    result = {}
    for size in (int(v) for v in args.vocab_sizes.split(",") if v):
        stage = build_stage(args, images, str(tmp / f"vocab_{size}"), random_vocab(size, tmp))
        for _ in range(args.warmup):
            this_stage(stage, args)
        result[str(size)] = min(this_stage(stage, args).wall for _ in range(args.repeats)) / args.images
        print(f"vocabulary M = {size:4d}: stage {result[str(size)]:.3f} s/image")
    return result


def profile(stage: PseudoLabelStage, args: argparse.Namespace) -> None:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.002)
    profiler.start()
    this_stage(stage, args)
    profiler.stop()
    print(profiler.output_text(unicode=False, color=False))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--data", choices=("camvid", "toyworld"), default="toyworld")
    parser.add_argument("--size", type=int, default=128, help="toy-world image side (the demo's)")
    parser.add_argument("--clip", default="toy-vit")
    parser.add_argument("--sam", default="toy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch", type=int, default=8, help="resources.batch_size (and the bare encoder batch)")
    parser.add_argument("--points", type=int, default=8, help="AMG points_per_side (SAM default 32)")
    parser.add_argument("--short-side", type=int, default=None, help="image_short_side (null keeps the size)")
    parser.add_argument("--crop", type=int, default=None, help="CLIP window (default: toy 64, else CLIP's input)")
    parser.add_argument("--stride", type=int, default=None, help="window step (default: crop / 2)")
    parser.add_argument("--cross-image-batches", action="store_true", help="batch_invariant: false")
    for switch in ("sdpa", "channels-last", "compile"):
        parser.add_argument(f"--{switch}", action="store_true", help=f"sam.{switch.replace('-', '_')}: true"
                            + (" (and clip.compile)" if switch == "compile" else ""))
    parser.add_argument("--exact-decoder", action="store_true",
                        help="sam.shared_image_decoder: false (segment_anything's two-way transformer in the stage)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best of each is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed stage runs first (0 for slow real-size runs)")
    parser.add_argument("--vocab-sizes", default="", help="e.g. 12,171,847: stage s/image per vocabulary size")
    parser.add_argument("--profile", action="store_true", help="print a pyinstrument profile of one stage run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0 = torch's default; 2 threads on a loaded 2-core machine are "
                             "slower than 1 and make the three measures incomparable)")
    args = parser.parse_args(argv)
    if args.crop is None and args.clip == "toy-vit":
        args.crop, args.stride = 64, args.stride or 32
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = write_images(args, tmp / "images")
        stage = build_stage(args, folder, str(tmp / "stage"))
        refs = stage.adapter.list_items()
        images = [stage.adapter.load(ref).image for ref in refs]
        for _ in range(args.warmup):  # allocator, lazy inits, torch.compile
            this_stage(stage, args)
        runs = {"a": lambda: bare_models(stage, images, args),
                "b": lambda: per_image_loop(stage, refs, tmp / "loop", args),
                "c": lambda: this_stage(stage, args)}
        timers: dict[str, list[Timer]] = {key: [] for key in runs}
        for _ in range(args.repeats):  # interleaved repeats, best of each: robust to other load on the machine
            for key, run in runs.items():
                timers[key].append(run())
        if args.profile:
            profile(stage, args)
        by_vocab = vocabulary_cost(args, folder, tmp) if args.vocab_sizes else {}
    summary = report(args, len(refs), timers)
    print(json.dumps(summary | {"precision": args.precision, "s_per_image_by_vocab": by_vocab}))


def report(args: argparse.Namespace, count: int, timers: dict[str, list[Timer]]) -> dict[str, Any]:
    """Print the table; return the JSON summary's rates (wall images/s, best of the repeats)."""
    wall = {k: count / min(t.wall for t in v) for k, v in timers.items()}
    cpu = {k: count / min(t.cpu for t in v) for k, v in timers.items()}
    print(f"{count} images ({args.data}), CLIP {args.clip}, SAM {args.sam}, {args.device} {args.precision}, "
          f"batch {args.batch}, AMG {args.points}x{args.points} points, short side {args.short_side}, "
          f"{'trained toy weights' if trained_toys(args) else 'random weights'}, best of {args.repeats}")
    for key, name in {"a": "bare models", "b": "per-image loop", "c": "this stage"}.items():
        print(f"({key}) {name:<15} wall {count / wall[key]:8.2f} s {wall[key]:8.2f} images/s   "
              f"cpu {count / cpu[key]:8.2f} s {cpu[key]:8.2f} images/s")
    for label, rate in (("wall", wall), ("cpu", cpu)):
        print(f"{label}: (c)/(a) efficiency {rate['c'] / rate['a']:.2f}   "
              f"(c)/(b) speed-up {rate['c'] / rate['b']:.2f}x")
    return {"bare_img_s": wall["a"], "loop_img_s": wall["b"], "stage_img_s": wall["c"],
            "efficiency": wall["c"] / wall["a"], "speedup": wall["c"] / wall["b"], "device": args.device,
            "clip": args.clip, "sam": args.sam, "images": count}


if __name__ == "__main__":
    main()
