"""The driver's view of Ray: starting or joining it, what the cluster's nodes hold, and where a worker runs.

`init_ray` is the one place a run starts or joins Ray. With `ray.address` or RAY_ADDRESS (`ray job submit` sets
it) the driver joins that cluster; with neither it starts a fresh local Ray (`address="local"`), never attaching
to whatever an earlier cluster left in Ray's temp directory. A failure either way is a `RayUnavailable` (exit 2)
whose one line says what to do.

Placement (design contract 7: a request the cluster cannot place fails fast, never hangs): a demand is a
resource dict for one task, actor or training worker, e.g. `{"CPU": 1.0, "GPU": 1.0}`; `check_placement`
compares it with the *total* resources of every alive node (not what is free now: other nodes of the DAG may
hold resources for a while, which is a wait, not a hang) and raises `PlacementError` naming the node, the demand
and what the cluster has when no node could ever host one unit.
"""

from __future__ import annotations

import math
import os
import socket
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pipeline.config import ConfigError

_INIT_LOCK = threading.Lock()  # nodes start Ray from their own threads; one of them initialises it


class RayUnavailable(ConfigError):
    """Ray could not be started or reached; the message says what to do."""


class PlacementError(ConfigError):
    """A task, actor or training worker asks for more than any node of the cluster has."""


def init_ray(ray_cfg: Mapping[str, Any]) -> None:
    """Join `ray.address` / RAY_ADDRESS when given, else start a fresh local Ray in this process (once)."""
    import ray

    with _INIT_LOCK:
        if ray.is_initialized():
            return
        address = ray_cfg.get("address") or os.environ.get("RAY_ADDRESS")
        try:
            if address:
                _probe(address)
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(address="local", num_cpus=ray_cfg.get("num_cpus"), include_dashboard=False,
                         log_to_driver=True, _temp_dir=ray_cfg.get("temp_dir"))
        except Exception as error:  # noqa: BLE001 - every way Ray fails to come up gets the same one-line advice
            text = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {text[0] if text else ''}"
            if address:
                raise RayUnavailable(f"cannot reach the Ray cluster at {address!r} ({reason}); start it "
                                     "(`ray start --head`) or fix ray.address / RAY_ADDRESS, or run without them "
                                     "for a local Ray") from None
            raise RayUnavailable(f"cannot start a local Ray ({reason}); check that ray.temp_dir (or /tmp) is "
                                 "writable and has space, or use executor=local") from None


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nobody listens where Ray will connect (Ray itself retries for many minutes).

    Ray rewrites a loopback host to this machine's interface address before connecting; the probe checks that
    resolved address, so a cluster bound to 127.0.0.1 only is reported here instead of hanging in `ray.init`.
    """
    if "://" in address:
        return  # "ray://..." (Ray Client) and other schemes: Ray checks these itself
    try:
        from ray._private.services import canonicalize_bootstrap_address

        address = canonicalize_bootstrap_address(address) or address
    except ImportError:  # a private helper; without it, probe the address as given
        pass
    host, _, port = address.rpartition(":")
    if host and port.isdigit():
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass


def demand(num_cpus: float, num_gpus: float = 0.0, custom: Mapping[str, float] | None = None) -> dict[str, float]:
    """The resource dict of one unit (task, actor, worker), without zero entries."""
    wanted = {"CPU": float(num_cpus), "GPU": float(num_gpus), **{k: float(v) for k, v in (custom or {}).items()}}
    return {name: amount for name, amount in wanted.items() if amount > 0}


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def units_on(wanted: Mapping[str, float], resources: Mapping[str, float]) -> float:
    """How many units of `wanted` one node with `resources` holds at once (inf when `wanted` is empty)."""
    return min((math.floor(resources.get(name, 0.0) / amount + 1e-9) for name, amount in wanted.items()),
               default=math.inf)


def capacity(wanted: Mapping[str, float], nodes: list[dict[str, float]]) -> float:
    """How many units of `wanted` the whole cluster holds at once."""
    return sum(units_on(wanted, resources) for resources in nodes)


def describe(nodes: list[dict[str, float]]) -> str:
    """The cluster's schedulable resources, grouped: "3 nodes: 1 x {CPU: 0}, 2 x {CPU: 1, GPU: 1}"."""
    def shape(resources: Mapping[str, float]) -> str:
        keep = {k: v for k, v in sorted(resources.items())
                if k not in ("memory", "object_store_memory") and not k.startswith("node:")}
        keep.setdefault("CPU", 0.0)
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in keep.items()) + "}"

    counts = Counter(shape(resources) for resources in nodes)
    return f"{len(nodes)} node(s): " + ", ".join(f"{n} x {s}" for s, n in sorted(counts.items()))


def fmt(wanted: Mapping[str, float]) -> str:
    """A demand as text: "{CPU: 1, GPU: 1}"."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(wanted.items())) + "}"


def check_placement(node: str, what: str, wanted: Mapping[str, float], count: int, fix: str,
                    all_at_once: bool = False) -> int:
    """How many of `count` units (at most) the cluster holds at once; PlacementError when not even one fits.

    Args:
        node: the DAG node asking, for the message.
        what: what one unit is, e.g. "each actor of the pool".
        wanted: one unit's resource dict (`demand`).
        count: the units asked for (pool size, workers).
        fix: the config keys to change, e.g. "pseudolabel.resources.num_gpus".
        all_at_once: the units only run together (a Ray Train worker group): PlacementError unless all fit.
    """
    nodes = alive_nodes()
    fits = capacity(wanted, nodes)
    if fits < (count if all_at_once else 1):
        need = f"{count} x {fmt(wanted)} at once" if all_at_once else fmt(wanted)
        raise PlacementError(f"{node}: {what} asks for {need}, which the cluster cannot hold (room for "
                             f"{int(min(fits, count))}); the cluster has {describe(nodes)}; lower {fix} or add "
                             f"nodes with these resources")
    return int(min(count, fits))


def where() -> dict[str, Any]:
    """Where the calling worker runs: Ray node id, node IP, host name, process id."""
    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
            "pid": os.getpid()}


def here() -> dict[str, Any]:
    """Where the driver runs (the local executor): host name and process id."""
    return {"node_id": "driver", "host": socket.gethostname(), "pid": os.getpid()}
