"""Print the README's "Results on the built-in toy world" table from two demo output roots.

    python -m pipeline.run conf=demo output_root=outputs/trained
    python -m pipeline.run conf=demo output_root=outputs/floor models.clip.pretrained=null models.sam.checkpoint=null
    python scripts/toy_results_table.py outputs/trained outputs/floor
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.shards import open_stage

EVAL_COLUMNS = ("mIoU", "pAcc", "mIoU(S)", "mIoU(U)", "hIoU")
PSEUDO_ROWS = (("stage11", "pseudo-labels, stage 1.1 (point prompts)"), ("stage12", "pseudo-labels, stage 1.2 (AMG)"),
               ("merged", "pseudo-labels, 1.1 + 1.2"))


def cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def eval_metrics(root: str) -> dict[str, dict]:
    output = open_stage(f"{root}/eval")
    return json.loads(Path(output.path, "metrics.json").read_text())["methods"]


def pseudo_quality(root: str) -> dict[str, dict]:
    output = open_stage(f"{root}/pseudolabel")
    return json.loads(Path(output.path, "pseudolabel_quality.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trained")
    parser.add_argument("floor")
    args = parser.parse_args()
    trained, floor = eval_metrics(args.trained), eval_metrics(args.floor)
    print("| method (toy val, 24 images) | " + " | ".join(EVAL_COLUMNS) + " | floor mIoU |")
    print("|---" * (len(EVAL_COLUMNS) + 2) + "|")
    for name, metrics in trained.items():
        values = " | ".join(cell(metrics.get(c)) for c in EVAL_COLUMNS)
        print(f"| {name} | {values} | {cell(floor.get(name, {}).get('mIoU'))} |")
    quality, floor_quality = pseudo_quality(args.trained), pseudo_quality(args.floor)
    print("\n| pseudo-labels vs toy-train GT (48 images) | coverage % | mIoU on labelled pixels | "
          "mIoU, unlabelled = wrong | floor, unlabelled = wrong |")
    print("|---|---|---|---|---|")
    for key, label in PSEUDO_ROWS:
        q, f = quality[key], floor_quality[key]
        print(f"| {label} | {cell(q['coverage'])} | {cell(q['mIoU_labelled'])} | "
              f"{cell(q['mIoU_unlabelled_as_wrong'])} | {cell(f['mIoU_unlabelled_as_wrong'])} |")


if __name__ == "__main__":
    main()
