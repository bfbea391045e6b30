"""The alignment module (Seifi et al.: frozen DINOv2 + TSupCon on pseudo-labels) with the trained toy DINOv2 vs the
random-init one, against the training-free MaskCLIP and SCLIP dense baselines, on held-out toy worlds.

    PYTHONPATH=. python scripts/bench_alignment.py --out outputs/alignment --seeds 1 2

Per world seed, `conf/demo.yaml` reduced to ``stages=[pseudolabel,train_align,eval]`` with the demo's sizes
(48 train scenes pseudo-labelled, 24 val scenes evaluated, both of toy world ``seed``; the demo and every toy
model's training use world 0), once per DINOv2 (``models.dinov2.weights``: the committed toy_dinov2.pt, then null);
the second run reuses the first's pseudo-labels (DINOv2 is not in their fingerprint). Prints one JSON line per run
and, last, the means over seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.run import compose, run
from pipeline.shards import open_stage

REPO = Path(__file__).resolve().parents[1]
TOY_DINOV2 = REPO / "assets" / "models" / "toy_dinov2.pt"
TOY_CLIP = REPO / "assets" / "models" / "toy_clip.pt"


def methods() -> str:
    """Eval methods: the alignment module and the two training-free dense baselines on the trained toy CLIP."""
    baselines = [f"{{name:{b},kind:maskclip,templates:maskclip85,clip:{{model_name:toy-vit,pretrained:{TOY_CLIP},"
                 f"dense:{b}}}}}" for b in ("maskclip", "sclip")]
    return "[" + ",".join(baselines + ["{name:align,kind:trained,input:align,knn:false}"]) + "]"


def measure(root: Path, seed: int, dinov2: str, extra: list[str]) -> dict:
    """One reduced demo run (plus the `extra` overrides); returns {method: mIoU/pAcc/mIoU(S)/mIoU(U)} (percent)."""
    overrides = [*extra, f"output_root={root}", "executor=local", "stages=[pseudolabel,train_align,eval]",
                 f"+pseudolabel.data.seed={seed}", f"+eval.data.seed={seed}",
                 "~eval.inputs", "+eval.inputs={align:train_align}",
                 f"eval.methods={methods()}", "eval.num_report_samples=0", f"models.dinov2.weights={dinov2}"]
    run(compose("demo", overrides))
    metrics = json.loads(Path(open_stage(str(root / "eval")).path, "metrics.json").read_text())["methods"]
    return {name: {k: m[k] for k in ("mIoU", "pAcc", "mIoU(S)", "mIoU(U)")} for name, m in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--dinov2", default=str(TOY_DINOV2), help="trained toy DINOv2 weights")
    parser.add_argument("--override", action="append", default=[],
                        help="extra Hydra override for every run, e.g. +train_align.align.loss=text_ce (repeatable)")
    parser.add_argument("--trained-only", action="store_true", help="skip the random-init DINOv2 runs")
    args = parser.parse_args()
    variants = (("trained_dinov2", args.dinov2),) + (() if args.trained_only else (("random_dinov2", "null"),))
    rows = {}
    for seed in args.seeds:
        for label, weights in variants:
            rows[f"seed{seed}/{label}"] = measure(args.out / f"seed{seed}", seed, weights, args.override)
            print(json.dumps({f"seed{seed}/{label}": rows[f"seed{seed}/{label}"]}), flush=True)
    mean = {label: {name: {k: sum(rows[f"seed{s}/{label}"][name][k] for s in args.seeds) / len(args.seeds)
                           for k in ("mIoU", "pAcc")} for name in rows[f"seed{args.seeds[0]}/{label}"]}
            for label, _ in variants}
    print(json.dumps({"seeds": args.seeds, "mean": mean}))


if __name__ == "__main__":
    main()
