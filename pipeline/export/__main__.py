"""`python -m pipeline.export SRC --format {coco,mmseg,hf} --out DIR [--split NAME] [--method NAME] [...]`.

Runs the `export` stage (`stages/export.py`) as a one-node run of `pipeline.run`, so the CLI and a preset's export
node share one code path: per-shard work on Ray (or `--executor local`), resume from done-markers, and an
unchanged source is not exported again. The run's bookkeeping (index shards, sidecars, done-markers, manifest)
lives in `DIR/.segetl/`. Exit codes: 0 ok, 1 failure ratio exceeded, 2 bad arguments, missing or unsafe input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.shards import join

BOOKKEEPING = ".segetl"
NODE = "export"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="stage output (path or fsspec URL; a node directory follows current.json)")
    parser.add_argument("--format", required=True, choices=["coco", "mmseg", "hf"])
    parser.add_argument("--out", required=True, help="export folder (path or fsspec URL)")
    parser.add_argument("--split", default="train", help="split name in the exported names (default: train)")
    parser.add_argument("--method", default=None, help="eval sources: the method whose predictions to export")
    parser.add_argument("--category-ids", default="auto", choices=["auto", "train_id_plus_one", "source_ids"])
    parser.add_argument("--verify", action="store_true", help="check each source shard's sha256 before reading")
    parser.add_argument("--executor", default="ray", choices=["ray", "local"])
    parser.add_argument("--max-failure-ratio", type=float, default=0.01)
    parser.add_argument("--force", action="store_true", help="export again even when up to date")
    return parser.parse_args(argv)


def absolute(url: str) -> str:
    """Local paths made absolute (workers must not depend on the driver's cwd); URLs as given."""
    return url if "://" in url else os.path.abspath(url)


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The one-node run config `pipeline.run.run` takes."""
    out = absolute(args.out)
    node = {"stage": "export", "inputs": {}, "source": absolute(args.source), "format": args.format, "out": out,
            "split": args.split, "method": args.method, "category_ids": args.category_ids, "verify": args.verify}
    return {"output_root": join(out, BOOKKEEPING), "seed": 0, "executor": args.executor, "stages": None,
            "force": [NODE] if args.force else [], "retry_failed": False, "max_failure_ratio": args.max_failure_ratio,
            "ray": {}, NODE: node}


def check_out(out: str) -> None:
    """ConfigError when `out` holds files but no earlier export's bookkeeping (never export over other data)."""
    import fsspec

    from pipeline.config import ConfigError

    fs, path = fsspec.core.url_to_fs(out)
    if fs.exists(path) and fs.ls(path) and not fs.exists(join(path, BOOKKEEPING)):
        raise ConfigError(f"--out {out} is not empty and holds no earlier export ({BOOKKEEPING}/); choose an empty "
                          "or new folder")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (exit codes in the module doc)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pipeline.config import ConfigError
    from pipeline.run import FailureRatioExceeded, run
    from pipeline.tar_samples import UnsafeShardError

    args = parse_args(argv)
    try:
        cfg = run_config(args)
        check_out(cfg[NODE]["out"])
        summary, = run(cfg)
    except (ConfigError, UnsafeShardError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FailureRatioExceeded as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"exported {summary.samples} samples ({summary.failed} failed) as {args.format} to {cfg[NODE]['out']}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
