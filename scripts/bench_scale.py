"""What the driver pays for a big input, and what object storage sees per shard.

    python scripts/bench_scale.py --items 1000000 --per-shard 256      # plan + manifest memory and time
    python scripts/bench_scale.py --items 0 --s3-images 16              # S3 request counts per shard (moto)

Part 1 builds a 1 M-item plan from generated item refs (no images: the refs a folder listing would give: keys
hashed and sorted, uniqueness checked), cuts it into shards with `shard_plans`, and sizes what the driver holds
(resident memory growth) and writes: the pickled task argument of one shard, the manifest and the run record.
Part 2 runs wordgrid and pseudolabel (image folder on s3://) against moto's S3 server on 127.0.0.1 and counts
HTTP requests by kind, per shard: a first run, an up-to-date rerun, and a resume (every shard committed, the
manifest removed, as after a kill). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pickle
import re
import socket
import sys
import time
from pathlib import Path

from pipeline.data.records import ItemRef, check_unique_keys, hashed_key
from pipeline.stage import shard_plans

KINDS = (("done-marker", ".done.json"), ("tar", ".tar"), ("sidecar", ".parquet"), ("image", ".png"),
         ("manifest", "manifest.json"), ("run record", "run.json"))


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def plan_cost(items: int, per_shard: int) -> dict:
    before, started = _rss_mb(), time.perf_counter()
    refs = sorted((ItemRef(hashed_key("pool", f"{i // 1000:05d}/img_{i:08d}.jpg"),
                           f"s3://bucket/pool/{i // 1000:05d}/img_{i:08d}.jpg") for i in range(items)),
                  key=lambda ref: ref.key)
    check_unique_keys(refs)
    listed = time.perf_counter() - started
    plans = shard_plans(refs, per_shard)
    planned = time.perf_counter() - started
    held = _rss_mb() - before
    shards = [{"name": f"{p.index:06d}.tar", "count": per_shard, "failed": 0, "sha256": "0" * 64,
               "bytes": 123456789} for p in plans]
    manifest = json.dumps({"shards": shards}, indent=1, sort_keys=True).encode()
    record = json.dumps({"placements": {f"{p.index:06d}": {"node_id": "f" * 56, "ip": "10.0.0.1", "host": "gpu-node",
                                                           "pid": 12345} for p in plans}}, indent=1).encode()
    return {"items": items, "shards": len(plans), "refs_s": round(listed, 2), "plan_s": round(planned - listed, 2),
            "driver_rss_mb": round(held, 1),
            "task_arg_kb": round(len(pickle.dumps(plans[0])) / 1024, 1),
            "manifest_mb": round(len(manifest) / 2**20, 2), "run_record_mb": round(len(record) / 2**20, 2)}


def s3_requests(images: int) -> dict:
    import fsspec
    from moto.server import ThreadedMotoServer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_s3 import _upload_images

    from pipeline.run import compose, run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    fsspec.config.conf["s3"] = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "x", "secret": "x"}
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    counts: collections.Counter = collections.Counter()
    phase = ["setup"]

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r'"(\w+) (\S+) HTTP', re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))
            if found:
                path, _, query = found.group(2).partition("?")
                what = "list" if "list-type" in query else next(
                    (kind for kind, end in KINDS if path.endswith(end)), "other")
                counts[(phase[0], f"{found.group(1)} {what}")] += 1

    logging.getLogger("werkzeug").setLevel(logging.INFO)
    logging.getLogger("werkzeug").addHandler(Count())
    fs = fsspec.filesystem("s3")
    fs.mkdir("segetl")
    folder = _upload_images(fs, images)
    base = ["output_root=s3://segetl/scale", "executor=local", "progress=off", "toy.size=64",
            "wordgrid.num_samples=1000", "wordgrid.samples_per_shard=100", "pseudolabel.samples_per_shard=2",
            "pseudolabel.amg.points_per_side=4", "~pseudolabel.data",
            f"+pseudolabel.data={{kind:folder,root:{folder},vocab:toy}}"]
    out, seconds = {}, {}
    for node, shards in (("wordgrid", 10), ("pseudolabel", images // 2)):
        for label in ("run", "up_to_date", "resume"):
            if label == "resume":  # every shard committed, no manifest: what the rerun after a kill reads
                fs.rm(fs.glob(f"segetl/scale/{node}/*/manifest.json"))
            phase[0] = f"{node}/{label}"
            started = time.perf_counter()
            run(compose("demo", [*base, f"stages=[{node}]"]))
            seconds[phase[0]] = round(time.perf_counter() - started, 2)
            out[phase[0]] = {k: round(v / shards, 2) for (p, k), v in sorted(counts.items()) if p == phase[0]}
    server.stop()
    return {"requests_per_shard": out, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--s3-images", type=int, default=0, help="also count S3 requests (moto) with N images")
    args = parser.parse_args()
    out = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    if args.items:
        out["plan"] = plan_cost(args.items, args.per_shard)
        print("plan:", out["plan"], flush=True)
    if args.s3_images:
        out["s3"] = s3_requests(args.s3_images)
        for phase, kinds in out["s3"]["requests_per_shard"].items():
            print(f"{phase:<24} requests per shard: {kinds}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
