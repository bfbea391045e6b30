"""The demo DAG (reduced) sequential vs concurrent, on a local Ray and on a simulated multi-node cluster.

    python scripts/bench_dag.py [--nodes 2 --gpu-nodes 2]

Sequential is `max_concurrent_nodes=1`, concurrent the default; both start from an empty output root in the same
Ray session. From the sequential run's records (`run.json`, uncontended node times): their sum and the critical
path (the longest upstream chain of durations); sum / critical path is what unlimited resources would give. On the
simulated cluster (`ray.cluster_utils.Cluster`, CPU nodes plus nodes declaring fake GPUs, all on this machine)
the model stages ask for a GPU, and the placement table shows which Ray node ran each DAG node's shards.
Prints a table, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
from pipeline import dag  # noqa: E402
from pipeline.cluster import init_ray  # noqa: E402
from pipeline.run import compose, run  # noqa: E402
from pipeline.shards import open_stage  # noqa: E402

REDUCED = ["toy.train_images=8", "toy.val_images=4", "toy.size=64", "wordgrid.num_samples=2000",
           "wordgrid.samples_per_shard=250", "train_ifseg.loop.steps=20", "train_ifseg_st.loop.steps=10",
           "train_align.loop.steps=10", "train_zegclip.loop.steps=10", "train_zegclip_st.loop.steps=10",
           "train_ifseg_st.image_size=64", "train_align.image_size=56", "selftrain.samples_per_shard=2",
           "pseudolabel.samples_per_shard=2", "eval.samples_per_shard=2", "pseudolabel.amg.points_per_side=4",
           "progress=off", "eval.num_report_samples=1"]
MODEL_STAGES = ("selftrain", "pseudolabel", "eval")


def one_run(root: Path, overrides: list[str]) -> dict:
    cfg = compose("demo", [f"output_root={root}", *REDUCED, *overrides])
    started = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - started
    nodes = dag.build_nodes(cfg)
    records = {n: json.loads(Path(open_stage(str(root / n)).path, "run.json").read_text()) for n in nodes}
    finish: dict[str, float] = {}
    for name in dag.topological_order(nodes):  # longest chain of durations ending at each node
        finish[name] = records[name]["seconds"] + max((finish[u] for u in nodes[name].inputs.values()), default=0)
    placement = {n: sorted(r["shards_per_worker_node"]) for n, r in records.items() if r["shards_per_worker_node"]}
    return {"wall_s": wall, "sum_nodes_s": sum(r["seconds"] for r in records.values()),
            "critical_path_s": max(finish.values()), "placement": placement}


def compare(label: str, base: list[str], work: Path) -> dict:
    seq = one_run(work / f"{label}-seq", [*base, "max_concurrent_nodes=1"])
    conc = one_run(work / f"{label}-conc", base)
    result = {"sequential_wall_s": round(seq["wall_s"], 1), "concurrent_wall_s": round(conc["wall_s"], 1),
              "speedup": round(seq["wall_s"] / conc["wall_s"], 2),  # node times of the uncontended sequential run:
              "critical_path_s": round(seq["critical_path_s"], 1), "sum_nodes_s": round(seq["sum_nodes_s"], 1),
              "ideal_speedup": round(seq["sum_nodes_s"] / seq["critical_path_s"], 2)}
    print(f"{label:<8} sequential {result['sequential_wall_s']:7.1f} s | "
          f"concurrent {result['concurrent_wall_s']:7.1f} s | speed-up {result['speedup']:.2f}x | "
          f"critical path {result['critical_path_s']:.1f} s of "
          f"{result['sum_nodes_s']:.1f} s node time (ideal {result['ideal_speedup']:.2f}x)", flush=True)
    return {**result, "placement": conc["placement"]}


def simulated_cluster(args: argparse.Namespace, temp_dir: str):
    from ray.cluster_utils import Cluster

    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)  # Ray writes <RAY_TMPDIR>/ray/ray_current_cluster
    os.environ["RAY_TMPDIR"] = temp_dir  # there, not in /tmp/ray (missing on a fresh machine; stale for others)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp_dir,
                                                            "include_dashboard": False})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=2, resources={"cpu_node": 1})
    for _ in range(args.gpu_nodes):
        cluster.add_node(num_cpus=1, num_gpus=1, resources={"gpu_node": 1})  # fake GPUs: placement only
    cluster.wait_for_nodes()
    return cluster


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="simulated CPU nodes (2 CPUs each)")
    parser.add_argument("--gpu-nodes", type=int, default=2, help="simulated nodes with 1 CPU and 1 fake GPU")
    args = parser.parse_args()
    work, temp_dir = Path(tempfile.mkdtemp(prefix="bench-dag-")), tempfile.mkdtemp(prefix="raybd", dir="/tmp")
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    init_ray({"num_cpus": 2, "temp_dir": temp_dir})  # started before timing: neither run pays Ray's start-up
    out["local"] = compare("local", ["executor=ray", "ray.num_cpus=2", f"ray.temp_dir={temp_dir}"], work)
    ray.shutdown()
    cluster = simulated_cluster(args, temp_dir)
    gpu = [f"{n}.resources.num_gpus=1" for n in MODEL_STAGES] + [f"{n}.resources.num_cpus=0.5" for n in MODEL_STAGES]
    try:
        init_ray({"address": cluster.address})
        out["cluster"] = compare("cluster", ["executor=ray", f"ray.address={cluster.address}", *gpu], work)
        kinds = {n["NodeID"]: "gpu" if "gpu_node" in n["Resources"] else "cpu" for n in ray.nodes()}
        out["cluster"]["placement"] = {node: sorted({kinds.get(i, "?") for i in ids})
                                       for node, ids in out["cluster"]["placement"].items()}
        print("placement (kind of Ray node that ran each DAG node's shards):", out["cluster"]["placement"])
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
