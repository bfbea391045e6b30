"""One writer per stage output: a lease file that works on any fsspec filesystem, object stores included.

`<output_root>/<node>/<fingerprint>/_lease.json` holds {owner, host, pid, node, started, heartbeat} while a run
writes that output. A second run on the same output waits until the holder releases it (then finds the manifest
the holder committed and is up to date), or, with `lease.wait_s=0`, fails at once naming the holder. A lease is
stale, and is taken over, when its pid is dead on this host or its heartbeat is older than `lease.stale_s`.

Claiming without locks: on local disks the lease is hard-linked into place, which fails when a lease exists, so
exactly one claimant wins. On object stores (no locks, no exclusive create) a claimant writes its lease, waits
`lease.settle_s` and reads it back: of concurrent writers only the last one reads its own lease. Either way the
holder's heartbeat thread re-reads the lease before each refresh, and a holder that finds another owner there
stops before publishing (`Lease.check`), so a lost race costs duplicate work, never a corrupt output.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import fsspec

from pipeline.shards import join, write_atomic

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
HOST = socket.gethostname()
_ACTIVE: set[str] = set()  # owner tokens held by this process
_MEMORY_LOCK = threading.Lock()  # fsspec's memory filesystem is per process: a lock makes its claims exclusive


@dataclass
class LeaseConfig:
    """The `lease:` block of the run config.

    Attributes:
        wait_s: how long a run waits for another run's lease on the same output; 0 = fail at once, naming it.
        stale_s: a lease whose heartbeat is older than this is taken over (its holder died on another host;
            on this host a dead pid is enough).
        heartbeat_s: how often the holder refreshes its heartbeat.
        settle_s: object stores only: the wait between writing a lease and reading it back.
        poll_s: how often a waiting run looks at the lease again.
    """

    wait_s: float = 86400.0
    stale_s: float = 300.0
    heartbeat_s: float = 10.0
    settle_s: float = 1.0
    poll_s: float = 1.0


class LeaseHeld(RuntimeError):
    """Another live run holds the lease and `wait_s` ran out; the message names it."""


class LeaseLost(RuntimeError):
    """Another run took this run's lease over (this run's heartbeat stalled past `stale_s`)."""


@dataclass
class Holder:
    """The contents of a lease file."""

    owner: str
    host: str
    pid: int
    node: str
    started: float
    heartbeat: float
    argv: list[str] = field(default_factory=list)

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return (f"pid {self.pid} on host {self.host} (node {self.node}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, heartbeat {age:.0f} s ago)")


def pid_alive(pid: int) -> bool:
    """True when process `pid` of this host exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_stale(holder: Holder, stale_s: float) -> bool:
    """Dead pid on this host (or this process, not holding it any more), or a heartbeat older than `stale_s`."""
    if holder.host == HOST:
        if holder.pid == os.getpid():
            return holder.owner not in _ACTIVE
        if not pid_alive(holder.pid):
            return True
    return time.time() - holder.heartbeat > stale_s


def read_holder(fs: fsspec.AbstractFileSystem, path: str) -> Holder | None:
    """The lease at `path`, or None when there is none (or it is unreadable: being replaced right now)."""
    try:
        return Holder(**json.loads(fs.cat_file(path)))
    except (FileNotFoundError, ValueError, TypeError):
        return None


class Lease:
    """A held lease; a daemon thread refreshes its heartbeat until `release`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, holder: Holder, cfg: LeaseConfig,
                 waited: bool) -> None:
        self.fs, self.path, self.holder, self.cfg, self.waited = fs, path, holder, cfg, waited
        self.lost: Holder | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{holder.node}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat_s):
            current = read_holder(self.fs, self.path)
            if current is not None and current.owner != self.holder.owner:
                self.lost = current
                return
            self.holder.heartbeat = time.time()
            write_atomic(self.fs, self.path, _encode(self.holder))

    def check(self) -> None:
        """Raise LeaseLost when another run has taken this lease over."""
        current = self.lost or read_holder(self.fs, self.path)
        if current is not None and current.owner != self.holder.owner:
            raise LeaseLost(f"{self.holder.node}: the lease on {self.path} was taken over by {current.describe()}; "
                            "this run's heartbeat stalled past lease.stale_s, so it stops before publishing")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still this run's."""
        self._stop.set()
        self._thread.join()
        _ACTIVE.discard(self.holder.owner)
        current = read_holder(self.fs, self.path)
        if current is not None and current.owner == self.holder.owner:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass


@contextmanager
def hold(fs: fsspec.AbstractFileSystem, out_path: str, cfg: LeaseConfig, node: str) -> Iterator[Lease]:
    """Hold the lease of the output directory `out_path` for the duration of the block (see `acquire`)."""
    lease = acquire(fs, join(out_path, LEASE_NAME), cfg, node)
    try:
        yield lease
    finally:
        lease.release()


def acquire(fs: fsspec.AbstractFileSystem, path: str, cfg: LeaseConfig, node: str) -> Lease:
    """Claim the lease at `path`, waiting up to `cfg.wait_s` for a live holder; take a stale one over.

    Raises:
        LeaseHeld: A live holder kept it for `wait_s`; the message names its host, pid and heartbeat.
    """
    now = time.time()
    me = Holder(uuid.uuid4().hex, HOST, os.getpid(), node, now, now, list(sys.argv))
    deadline, waited = time.monotonic() + cfg.wait_s, False
    while True:
        current = read_holder(fs, path)
        if current is None or is_stale(current, cfg.stale_s):
            if current is not None:
                log.warning("%s: taking over the stale lease of %s", node, current.describe())
            _ACTIVE.add(me.owner)  # before the claim: a thread of this process must never see our fresh lease as stale
            if _claim(fs, path, me, current, cfg.settle_s):
                return Lease(fs, path, me, cfg, waited)
            _ACTIVE.discard(me.owner)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LeaseHeld(f"{node}: another run is writing this output ({path}): {current.describe()}; wait for it, "
                            "or set lease.wait_s to wait longer (a dead holder's lease is taken over after "
                            "lease.stale_s)")
        if not waited:
            log.info("%s: waiting for %s to commit this output", node, current.describe())
            waited = True
        time.sleep(min(cfg.poll_s, remaining))


def _encode(holder: Holder) -> bytes:
    return json.dumps(asdict(holder), indent=1).encode()


def _claim(fs: fsspec.AbstractFileSystem, path: str, me: Holder, stale: Holder | None, settle_s: float) -> bool:
    """Try once to make `me` the holder; True on success."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        return _claim_local(path, me, stale)
    if "memory" in protocols:
        with _MEMORY_LOCK:
            current = read_holder(fs, path)
            if current is not None and (stale is None or current.owner != stale.owner):
                return False
            fs.pipe_file(path, _encode(me))
            return True
    fs.pipe_file(path, _encode(me))  # object stores: last writer wins; read back after the settle time
    time.sleep(settle_s)
    current = read_holder(fs, path)
    return current is not None and current.owner == me.owner


def _claim_local(path: str, me: Holder, stale: Holder | None) -> bool:
    """Hard-link a complete lease file into place: the link fails when a lease exists, so one claimant wins."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if stale is not None:
        current = read_holder(fsspec.filesystem("file"), path)
        if current is not None and current.owner == stale.owner:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    tmp = f"{path}.{me.owner}"
    with open(tmp, "wb") as handle:
        handle.write(_encode(me))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here: exclusive create (a reader may see it empty for a moment)
        return _create_exclusive(path, _encode(me))
    finally:
        os.unlink(tmp)


def _create_exclusive(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return True
