"""Measure each dense-feature backend (`ClipConfig.dense`) through the demo's pseudolabel stage and the eval stage's
training-free baseline, trained toy CLIP + SAM against random weights (the floor), on held-out toy worlds.

    PYTHONPATH=. python scripts/bench_dense_backends.py --out outputs/dense_backends --seeds 1 2 --images 12 \
        --vocab toy synonyms

Each (vocabulary, backend, world seed, weights) runs `conf/demo.yaml` reduced to ``stages=[pseudolabel,
quality_eval]``: pseudo-labels on ``--images`` train scenes of toy world ``seed`` and the baseline on as many val
scenes of the same world (the demo itself, and every toy model's training, uses world 0). ``synonyms`` prompts with
scripts/toy_synonyms.yaml's renamed-synonym names (same classes and ids). ProxyCLIP's proxy is the toy DINOv2 of
``--proxy-weights`` (default: the committed assets/models/toy_dinov2.pt when present, else random init).
Results accumulate in ``--out``/results.json (a re-run skips measured keys). Prints a markdown table per vocabulary
(mean over seeds, floor in parentheses) and, last, one JSON line: the per-backend means and ``winner``, the backend
with the highest pseudo-label mIoU on labelled pixels among those whose coverage is at least MaskCLIP's (toy
vocabulary).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.run import compose, run
from pipeline.shards import open_stage

BACKENDS = ("maskclip", "sclip", "clearclip", "naclip", "proxyclip")
REPO = Path(__file__).resolve().parents[1]
SYNONYMS = REPO / "scripts" / "toy_synonyms.yaml"
TOY_DINOV2 = REPO / "assets" / "models" / "toy_dinov2.pt"
FIELDS = ("pl_coverage", "pl_miou_labelled", "pl_miou", "eval_miou", "eval_pacc")


def proxy_value(weights: str) -> str:
    """Hydra value of ProxyCLIP's toy DINOv2 proxy config."""
    return f"{{name:toy,weights:{weights}}}"


def dense_clip(backend: str, trained: bool, proxy_weights: str) -> str:
    """The Hydra value of a toy CLIP config with `backend` (`pretrained` null for the floor)."""
    weights = REPO / "assets" / "models" / "toy_clip.pt" if trained else "null"
    proxy = f",proxy:{proxy_value(proxy_weights)}" if backend == "proxyclip" else ""
    return f"{{model_name:toy-vit,pretrained:{weights},dense:{backend}{proxy}}}"


def measure(root: Path, backend: str, seed: int, images: int, trained: bool, vocab: str, proxy_weights: str) -> dict:
    """One reduced demo run; returns pseudo-label coverage/mIoU and the baseline's mIoU/pAcc (percent)."""
    clip = dense_clip(backend, trained, proxy_weights)
    variant = ",name_variant:synonym" if vocab == "synonyms" else ""
    overrides = [
        f"output_root={root}", "executor=local", "stages=[pseudolabel,quality_eval]",
        f"toy.train_images={images}", f"+pseudolabel.data.seed={seed}", f"pseudolabel.samples_per_shard={images}",
        f"pseudolabel.clip.dense={backend}", "+stage@quality_eval=eval", "quality_eval.num_report_samples=0",
        f"+quality_eval.data={{kind:toyworld,split:val,num_images:{images},size:128,seed:{seed}}}",
        "+quality_eval.protocol_overrides.short_side=128",
        f"quality_eval.methods=[{{name:maskclip,kind:maskclip,templates:maskclip85,clip:{clip}{variant}}}]",
    ]
    if vocab == "synonyms":  # same classes and ids, prompts from the renamed-synonym variant
        overrides += [f"pseudolabel.vocab={SYNONYMS}", f"quality_eval.vocab={SYNONYMS}",
                      "pseudolabel.name_variant=synonym"]
    if backend == "proxyclip":
        overrides.append(f"+pseudolabel.clip.proxy={proxy_value(proxy_weights)}")
    if not trained:
        overrides += ["models.clip.pretrained=null", "models.sam.checkpoint=null"]
    run(compose("demo", overrides))
    quality = json.loads(Path(open_stage(str(root / "pseudolabel")).path, "pseudolabel_quality.json").read_text())
    metrics = json.loads(Path(open_stage(str(root / "quality_eval")).path, "metrics.json").read_text())
    merged, baseline = quality["merged"], metrics["methods"]["maskclip"]
    return {"pl_coverage": merged["coverage"], "pl_miou_labelled": merged.get("mIoU_labelled"),
            "pl_miou": merged["mIoU_unlabelled_as_wrong"], "eval_miou": baseline["mIoU"], "eval_pacc": baseline["pAcc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--vocab", nargs="+", default=["toy", "synonyms"], choices=("toy", "synonyms"),
                        help="toy: official names; synonyms: scripts/toy_synonyms.yaml's renamed-synonym prompts")
    parser.add_argument("--proxy-weights", default=str(TOY_DINOV2) if TOY_DINOV2.exists() else "null",
                        help="ProxyCLIP's toy DINOv2 weights (null: random init)")
    args = parser.parse_args()
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for vocab in args.vocab:
        for backend in args.backends:
            for seed in args.seeds:
                for trained in (True, False):
                    key = f"{vocab}/{backend}/seed{seed}/{'trained' if trained else 'floor'}"
                    if key not in results:
                        results[key] = measure(args.out / key, backend, seed, args.images, trained, vocab,
                                               args.proxy_weights)
                        args.out.mkdir(parents=True, exist_ok=True)
                        results_path.write_text(json.dumps(results, indent=1, sort_keys=True))
                    print(key, results[key], flush=True)
    summary = {vocab: means(results, vocab, args.backends, args.seeds) for vocab in args.vocab}
    for vocab in args.vocab:
        print_table(summary[vocab], vocab)
    winner = choose(summary["toy"]) if "toy" in summary else None
    print(json.dumps({"seeds": args.seeds, "images": args.images, "means": summary, "winner": winner}))


def means(results: dict, vocab: str, backends: list[str], seeds: list[int]) -> dict:
    """{backend: {"trained"|"floor": {field: mean over seeds}}}."""
    return {backend: {w: {name: sum(results[f"{vocab}/{backend}/seed{s}/{w}"][name] for s in seeds) / len(seeds)
                          for name in FIELDS} for w in ("trained", "floor")} for backend in backends}


def choose(summary: dict) -> str:
    """The backend with the best trained pseudo-label mIoU on labelled pixels at coverage >= MaskCLIP's
    (all backends compete when MaskCLIP was not measured)."""
    floor = summary["maskclip"]["trained"]["pl_coverage"] if "maskclip" in summary else 0.0
    eligible = [b for b in summary if summary[b]["trained"]["pl_coverage"] >= floor]
    return max(eligible, key=lambda b: summary[b]["trained"]["pl_miou_labelled"])


def print_table(summary: dict, vocab: str) -> None:
    """Markdown: per backend, trained mean over seeds (floor in parentheses) for each measured quantity."""
    print(f"| backend ({vocab}) | PL coverage % | PL mIoU on labelled | PL mIoU (unlabelled = wrong) | baseline mIoU "
          "| baseline pAcc |")
    print("|---|---|---|---|---|---|")
    for backend, row in summary.items():
        cells = [f"{row['trained'][name]:.1f} ({row['floor'][name]:.1f})" for name in FIELDS]
        print(f"| {backend} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
