"""`python -m pipeline.inspect SRC [--json] [--diff OTHER] [--max-samples N]`: what is in a stage output.

Prints the node, kind, fingerprint, schema, upstream, counts and resolved config from `manifest.json`; the failed
samples of every shard's parquet sidecar grouped by reason (paths and numbers in the error text are masked so
equal causes group together, one example each); and a class histogram (pixels per class of each label-map
member, masks per class of `masks.json`, cells of `grid.npy`) over the first `--max-samples` samples.
`--json` prints the same as JSON. `--diff OTHER` compares two outputs (usually two fingerprints of one node):
every config, identity, upstream and code-version entry that differs. Exit codes: 0 ok, 2 missing output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.sample_files import decode_member
from pipeline.shards import StageOutput, join, open_stage

_PATH = re.compile(r"'[^']*'|\"[^\"]*\"|(?<!\S)(?:[A-Za-z][\w+.-]*://|~|\.{0,2}/)\S*")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def failure_reason(error: str) -> str:
    """The error text with quoted strings and paths masked as <path> and numbers as N (one group per cause)."""
    return _NUMBER.sub("N", _PATH.sub("<path>", error or "")).strip() or "(no error text)"


def failures(output: StageOutput) -> list[dict[str, Any]]:
    """Failed samples of all sidecars grouped by `failure_reason`: [{reason, count, example: {key, error}}]."""
    import pyarrow.parquet as pq

    groups: dict[str, dict[str, Any]] = {}
    for shard in output.manifest.get("shards", []):
        with output.fs.open(join(output.path, shard["name"].replace(".tar", ".parquet")), "rb") as handle:
            rows = pq.read_table(handle, columns=["key", "status", "error"]).to_pylist()
        for row in rows:
            if row["status"] != "failed":
                continue
            group = groups.setdefault(failure_reason(row["error"]),
                                      {"count": 0, "example": {"key": row["key"], "error": row["error"]}})
            group["count"] += 1
    return sorted(({"reason": reason, **group} for reason, group in groups.items()),
                  key=lambda g: (-g["count"], g["reason"]))


def class_histogram(output: StageOutput, names: Sequence[str], ignore_index: int,
                    max_samples: int) -> dict[str, Any]:
    """Per class: pixels of every label-map member (`*.png` other than the image, `grid.npy` cells) and masks of
    `masks.json`, over the first `max_samples` samples. Ids outside the vocabulary count as "ignore"."""
    pixels: dict[str, Counter[str]] = {}
    masks: Counter[str] = Counter()
    read = 0
    for sample in output.samples() if max_samples > 0 else ():
        read += 1
        for ext, data in sample.items():
            if ext.endswith(".png") or ext.endswith(".npy"):
                pixels.setdefault(ext, Counter()).update(_id_counts(decode_member(ext, data), names))
            elif ext == "masks.json":
                masks.update(_name(int(m["category_id"]), names) for m in json.loads(data))
        if read >= max_samples:
            break
    return {"samples_read": read, "pixels": {member: dict(c) for member, c in pixels.items()},
            "masks": dict(masks), "ignore_index": ignore_index, "names": list(names)}


def _name(class_id: int, names: Sequence[str]) -> str:
    return names[class_id] if 0 <= class_id < len(names) else "ignore"


def _id_counts(array: np.ndarray, names: Sequence[str]) -> Counter[str]:
    values, counts = np.unique(np.asarray(array).astype(np.int64), return_counts=True)
    out: Counter[str] = Counter()
    for value, count in zip(values, counts):
        out[_name(int(value), names)] += int(count)
    return out


def summarize(output: StageOutput, max_samples: int = 200) -> dict[str, Any]:
    """Everything `inspect` shows, as JSON-safe data."""
    manifest = output.manifest
    vocab = manifest.get("vocab") or {}
    names = [c["name"] for c in vocab.get("classes", [])]
    shards = manifest.get("shards", [])
    summary = {
        "path": _url(output), "node": manifest.get("node"), "kind": manifest.get("kind"),
        "fingerprint": manifest.get("fingerprint"), "schema": manifest.get("schema"),
        "code_version": manifest.get("code_version"), "upstream": manifest.get("upstream", {}),
        "identities": manifest.get("identities", {}), "config": manifest.get("config", {}),
        "counts": {"samples": manifest.get("num_samples", 0), "failed": manifest.get("num_failed", 0),
                   "shards": len(shards), "bytes": sum(int(s.get("bytes", 0)) for s in shards)},
        "failures": failures(output),
    }
    if shards:
        summary["histogram"] = class_histogram(output, names, int(vocab.get("ignore_index", 255)), max_samples)
    return summary


def _url(output: StageOutput) -> str:
    return output.path if "file" in output.fs.protocol else output.fs.unstrip_protocol(output.path)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {"a.b.c": leaf}; lists stay leaves."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def diff(this: StageOutput, other: StageOutput) -> list[dict[str, Any]]:
    """[{key, this, other}] for every differing config / identity / upstream / code-version entry."""
    def comparable(output: StageOutput) -> dict[str, Any]:
        m = output.manifest
        return flatten({"node": m.get("node"), "kind": m.get("kind"), "code_version": m.get("code_version"),
                        "config": m.get("config", {}), "identities": m.get("identities", {}),
                        "upstream": m.get("upstream", {})})

    left, right = comparable(this), comparable(other)
    return [{"key": key, "this": left.get(key), "other": right.get(key)}
            for key in sorted(set(left) | set(right)) if left.get(key) != right.get(key)]


def render(summary: Mapping[str, Any]) -> str:
    """The readable table form of `summarize`."""
    counts = summary["counts"]
    lines = [f"{k:<12} {summary[k]}" for k in ("path", "node", "kind", "fingerprint", "schema", "code_version")]
    lines.append(f"{'samples':<12} {counts['samples']} ok, {counts['failed']} failed, {counts['shards']} shards, "
                 f"{counts['bytes']} bytes")
    for port, up in summary["upstream"].items():
        lines.append(f"{'upstream':<12} {port} <- {up.get('node')} @ {up.get('fingerprint')}")
    lines += ["", "config:"] + [f"  {k} = {json.dumps(v)}" for k, v in flatten(summary["config"]).items()]
    lines += ["", f"failed samples by reason ({counts['failed']}):"]
    lines += [f"  {g['count']:>7}  {g['reason']}    e.g. {g['example']['key']}: {g['example']['error']}"
              for g in summary["failures"]] or ["  none"]
    hist = summary.get("histogram")
    if hist:
        lines += ["", f"class histogram (first {hist['samples_read']} samples):"]
        members = sorted(hist["pixels"])
        present = {c for m in members for c in hist["pixels"][m]} | set(hist["masks"])
        classes = [c for c in hist["names"] if c in present] + sorted(present - set(hist["names"]))
        lines.append("  " + f"{'class':<20}" + "".join(f"{m:>16}" for m in members) + f"{'masks':>10}")
        for name in classes:
            cells = "".join(f"{hist['pixels'][m].get(name, 0):>16}" for m in members)
            lines.append(f"  {name:<20}{cells}{hist['masks'].get(name, 0):>10}")
    return "\n".join(lines)


def render_diff(rows: Sequence[Mapping[str, Any]], this: StageOutput, other: StageOutput) -> str:
    head = [f"this:  {_url(this)}", f"other: {_url(other)}", ""]
    if not rows:
        return "\n".join([*head, "no differences in config, identities, upstream or code version"])
    width = max(len(r["key"]) for r in rows)
    return "\n".join([*head, *(f"{r['key']:<{width}}  {json.dumps(r['this'])}  ->  {json.dumps(r['other'])}"
                               for r in rows)])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="stage output: node directory (follows current.json) or fingerprint directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--diff", metavar="OTHER", help="compare with another output of the node")
    parser.add_argument("--max-samples", type=int, default=200, help="samples read for the class histogram")
    args = parser.parse_args(argv)
    try:
        this = open_stage(args.source)
        other = open_stage(args.diff) if args.diff else None
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if other is not None:
        rows = diff(this, other)
        print(json.dumps(rows, indent=1, default=str) if args.json else render_diff(rows, this, other))
        return 0
    summary = summarize(this, args.max_samples)
    print(json.dumps(summary, indent=1, default=str) if args.json else render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
