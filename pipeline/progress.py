"""What the driver shows and keeps about each running node: progress output, stall warnings, the run record.

Progress modes (the `progress` key):

- `bar`: one tqdm bar per running node (for a terminal);
- `lines`: every `progress_interval_s` one log line per running node, e.g.
  `progress pseudolabel: 7/12 shards, 28 samples, 1.9 samples/s, ETA 0:00:03` (for logs: `ray job submit`, CI);
- `off`; `auto`: `bar` when stderr is a terminal, else `lines`.

A trainer's step loop runs on its own worker and shows its steps with `StepProgress` the same way (a bar on a
terminal, else a line every 10 s).

The scheduler gives each node's thread a `NodeRun` (`Board.node_run`); the executors find it with `current` and
report shards, placements and events to it. When the node ran, its run record (start and end time, where each
shard ran, re-dispatched shards, events) is written to `run.json` beside the node's manifest: never into the
manifest or the shards, which stay byte-identical across runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import fsspec

from pipeline.shards import ShardDone, join, write_atomic

log = logging.getLogger("pipeline.progress")
PROGRESS_MODES = ("auto", "bar", "lines", "off")
RECORD_NAME = "run.json"


class RunAborted(RuntimeError):
    """Another node of the run failed; this node stopped early (its committed shards stay for the rerun)."""


@dataclass
class NodeRun:
    """The live state of one node's run, and its run record.

    Attributes:
        node: the DAG node.
        stall_timeout_s: log the pending shards when no shard finished for this long.
        abort: set by the scheduler when another node failed; executors stop at their next check.
        started, ended: wall-clock times (Unix seconds) of the node's start and end.
        total, done, samples: shards to run now, shards finished, samples in them (ok ones).
        placements: shard name -> where it ran (`pipeline.cluster.where`).
        redispatched: shards sent to another actor after their actor or its node died.
        events: notable things that happened (an actor lost, a pool shrunk), in order.
        metrics: timings a stage reports about this run (e.g. a trainer's samples/s): kept here, never in the
            manifest.
    """

    node: str
    stall_timeout_s: float = 300.0
    abort: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    total: int = 0
    done: int = 0
    samples: int = 0
    placements: dict[str, dict[str, Any]] = field(default_factory=dict)
    redispatched: int = 0
    events: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "running"
    board: Board | None = field(default=None, repr=False)
    _began: float | None = field(default=None, repr=False)
    _last_progress: float = field(default_factory=time.monotonic, repr=False)

    def begin(self, total: int) -> None:
        """The executor starts `total` shards."""
        self.total, self._began, self._last_progress = total, time.monotonic(), time.monotonic()
        if self.board is not None:
            self.board.begin(self)

    def shard_done(self, done: ShardDone, where: dict[str, Any]) -> None:
        """A shard committed; `where` is the worker that ran it."""
        self.done += 1
        self.samples += done.count
        self.placements[done.shard] = dict(where)
        self._last_progress = time.monotonic()
        if self.board is not None:
            self.board.update(self)

    def note(self, message: str) -> None:
        """Log a warning about this node and keep it in the run record."""
        log.warning("%s: %s", self.node, message)
        self.events.append(message)

    def check_abort(self) -> None:
        if self.abort.is_set():
            raise RunAborted(f"{self.node}: stopped because another node failed; committed shards are kept")

    def check_stall(self, pending: Callable[[], str]) -> None:
        """Log `pending()` (which shards wait, and where) when nothing finished for `stall_timeout_s`."""
        quiet = time.monotonic() - self._last_progress
        if quiet >= self.stall_timeout_s:
            log.warning("%s: no shard finished for %.0f s (%d/%d done); pending: %s", self.node, quiet, self.done,
                        self.total, pending())
            self._last_progress = time.monotonic()

    def line(self) -> str:
        """One progress line: node, shards done/total, samples, rate, ETA."""
        if self._began is None:
            return f"{self.node}: running for {time.time() - self.started:.0f} s"
        elapsed = max(time.monotonic() - self._began, 1e-9)
        eta = "?" if not self.done else _clock((self.total - self.done) * elapsed / self.done)
        return (f"{self.node}: {self.done}/{self.total} shards, {self.samples} samples, "
                f"{self.samples / elapsed:.1f} samples/s, ETA {eta}")

    def record(self, error: str | None = None) -> dict[str, Any]:
        """The run record (JSON-safe)."""
        ended = self.ended or time.time()
        hosts = Counter(str(w.get("node_id")) for w in self.placements.values())
        return {"node": self.node, "status": self.status, "error": error, "started": self.started, "ended": ended,
                "started_utc": _utc(self.started), "ended_utc": _utc(ended), "seconds": ended - self.started,
                "shards_run": self.done, "samples": self.samples, "redispatched": self.redispatched,
                "events": self.events, "metrics": dict(sorted(self.metrics.items())),
                "shards_per_worker_node": dict(sorted(hosts.items())),
                "placements": dict(sorted(self.placements.items()))}


_CURRENT: contextvars.ContextVar[NodeRun | None] = contextvars.ContextVar("segetl_node_run", default=None)


def current(node: str) -> NodeRun:
    """The NodeRun of `node` in this thread, or a detached one (executors used outside a run)."""
    run = _CURRENT.get()
    return run if run is not None and run.node == node else NodeRun(node)


class Board:
    """Renders the progress of every running node (`bar`, `lines` or `off`) and prints the summary lines."""

    def __init__(self, mode: str = "auto", interval_s: float = 10.0, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if _isatty(self.stream) else "lines"
        self.mode, self.interval_s = mode, interval_s
        self.active: dict[str, NodeRun] = {}
        self.bars: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ticker: threading.Thread | None = None

    @contextlib.contextmanager
    def node_run(self, node: str, stall_timeout_s: float, abort: threading.Event,
                 record_dir: tuple[fsspec.AbstractFileSystem, str] | None = None) -> Iterator[NodeRun]:
        """Show `node` while the block runs; then write its run record into `record_dir` if it ran or failed.

        The block sets `run.status` ("ran", "up to date", ...); a record is written for "ran", and for a failure
        after shards started (status "failed", or "stopped" when another node's failure aborted it; with the error).
        """
        run = NodeRun(node, stall_timeout_s, abort, board=self)
        token = _CURRENT.set(run)
        with self.lock:
            self.active[node] = run
            if self.mode == "lines" and self.ticker is None:
                self.ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
                self.ticker.start()
        error: str | None = None
        try:
            yield run
        except BaseException as exc:
            run.status = "stopped" if isinstance(exc, RunAborted) else "failed"
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            run.ended = time.time()
            _CURRENT.reset(token)
            self._end(run)
            if record_dir is not None and (run.status == "ran" or (run.status != "up to date" and run.total)):
                fs, path = record_dir
                write_atomic(fs, join(path, RECORD_NAME), json.dumps(run.record(error), indent=1).encode())

    def begin(self, run: NodeRun) -> None:
        if self.mode != "bar":
            return
        from tqdm import tqdm

        with self.lock:
            position = min(set(range(len(self.bars) + 1)) - {b.pos for b in self.bars.values()})
            self.bars[run.node] = tqdm(total=run.total, desc=f"{run.node:>14}", unit="shard", position=position,
                                       leave=False, dynamic_ncols=True, mininterval=0.5, file=self.stream)

    def update(self, run: NodeRun) -> None:
        bar = self.bars.get(run.node)
        if bar is not None:
            bar.set_postfix(samples=run.samples, refresh=False)
            bar.update(1)

    def _end(self, run: NodeRun) -> None:
        with self.lock:
            self.active.pop(run.node, None)
            bar = self.bars.pop(run.node, None)
        if bar is not None:
            bar.close()

    def _tick(self) -> None:
        while not self.stop.wait(self.interval_s):
            with self.lock:
                lines = [run.line() for run in self.active.values()]
            for line in lines:
                log.info("progress %s", line)

    def print_line(self, text: str) -> None:
        """A summary line on stdout, above any bars."""
        if self.bars:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        self.stop.set()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StepProgress:
    """Progress of a step loop (a trainer, on its worker): a tqdm bar when `stream` is a terminal, else a log
    line every `interval_s`, e.g. `progress train_ifseg: step 120/2000, 64.0 samples/s, ETA 0:00:29, loss=0.41`.

    Args:
        name: what steps (the node).
        total, initial: the last step and the step it starts at (a resumed loop starts past 0).
        samples_per_step: for the rate.
        enabled: False on ranks other than 0 (nothing is shown).
    """

    def __init__(self, name: str, total: int, initial: int = 0, samples_per_step: int = 0, enabled: bool = True,
                 interval_s: float = 10.0, stream: TextIO | None = None) -> None:
        self.name, self.total, self.step, self.samples_per_step = name, total, initial, samples_per_step
        self.enabled, self.interval_s, self.postfix = enabled, interval_s, ""
        self.began, self.first, self.shown = time.monotonic(), initial, time.monotonic()
        self.bar = None
        stream = stream or sys.stderr
        if enabled and _isatty(stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, unit="step", mininterval=1.0, file=stream)

    def update(self, steps: int = 1, **postfix: Any) -> None:
        """`steps` more steps done; `postfix` (e.g. loss=0.41) is shown from now on."""
        self.step += steps
        if postfix:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)
        elif self.enabled and (time.monotonic() - self.shown >= self.interval_s or self.step >= self.total):
            log.info("progress %s", self.line())
            self.shown = time.monotonic()

    def line(self) -> str:
        elapsed, done = max(time.monotonic() - self.began, 1e-9), self.step - self.first
        eta = "?" if not done else _clock((self.total - self.step) * elapsed / done)
        text = (f"{self.name}: step {self.step}/{self.total}, {done * self.samples_per_step / elapsed:.1f} "
                f"samples/s, ETA {eta}")
        return f"{text}, {self.postfix}" if self.postfix else text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _utc(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix)) + f".{int(unix % 1 * 1000):03d}Z"
