"""Prometheus metrics: one scrape of ``/metrics`` on any worker gives the totals of every worker.

With several worker processes, prometheus-client's multiprocess mode is used:
each process writes its values to small memory-mapped files in one directory
(``PROMETHEUS_MULTIPROC_DIR``) and the worker that answers a scrape sums them.
The directory is found, in order:

* ``PROMETHEUS_MULTIPROC_DIR`` when set: by ``secure-ws serve --workers N``
  (a fresh private directory per run, created before the workers start and
  removed at exit, :func:`run_directory`) or by the operator (gunicorn and
  other forking servers: wipe it before each start, as prometheus-client asks);
* under ``uvicorn --workers N`` (or ``--reload``), where the workers are
  multiprocessing children of uvicorn's supervisor, a directory named after that
  supervisor (pid and start time), shared by its workers only, under a private
  per-user directory in the temp dir; the directories of supervisors no longer
  running are swept by the next start (:func:`_supervisor_directory`);
* otherwise (one process) there is none and metrics live in memory.

The hot path stays lock-free: what happens per frame (messages, rate-limited
frames, deliveries, publishes, frame and storage latencies) is counted in plain
numbers on :data:`STATS` and in :class:`Timings`, and moved into the prometheus
metrics by :func:`flush` — every second by each worker, and by the answering
worker at scrape time. A worker's last second of counts may therefore appear in
the next scrape, never lost: the final flush runs when the worker stops.

Every label takes values from a fixed set (handshake results, close codes and
the reasons of :mod:`secure_ws.wire.closes`, storage operations, key sources),
so no client can grow the number of series. This module imports nothing of
ours but :mod:`secure_ws.wire`, so every layer may count here.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import multiprocessing
import os
import platform
import shutil
import stat
import tempfile
from bisect import bisect_left
from collections.abc import Iterator
from time import perf_counter
from typing import Any

from .wire import closes

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_INTERVAL = 1.0

log = logging.getLogger("secure_ws.metrics")


# -- where the worker processes meet ---------------------------------------------------------------


def _start_ticks(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc), so a reused pid is not taken for the
    same supervisor; "0" where /proc is not there; None if the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except FileNotFoundError:
        return None
    except (OSError, IndexError, ValueError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:  # PermissionError: alive, someone else's
        pass
    return "0"


def _private_root() -> str:
    """``<tmp>/secure-ws-metrics-<uid>``, 0700 and ours: another user must not choose what we write or read."""
    root = os.path.join(tempfile.gettempdir(), f"secure-ws-metrics-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{root} is not a private directory of this user")
    return root


def _supervisor_directory(pid: int) -> str:
    root = _private_root()
    # Sweep the directories of supervisors that have ended: bounded by the supervisors running at once.
    for name in os.listdir(root):
        owner, _, ticks = name.partition("-")
        if not owner.isdigit() or _start_ticks(int(owner)) != ticks:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    path = os.path.join(root, f"{pid}-{_start_ticks(pid)}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    return path


def _multiprocess_directory() -> str | None:
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        return path
    parent = multiprocessing.parent_process()  # uvicorn's workers are spawned multiprocessing children
    if parent is None or parent.pid is None:
        return None
    try:
        path = _supervisor_directory(parent.pid)
    except OSError as exc:
        log.warning("metrics: %s; each worker's /metrics shows only its own counts", exc)
        return None
    os.environ[MULTIPROC_ENV] = path  # what prometheus-client reads, and what this worker's children inherit
    return path


@contextlib.contextmanager
def run_directory(workers: int) -> Iterator[None]:
    """For ``secure-ws serve``: with several workers and no directory given, a private one for this run,
    made before the workers start (they inherit the variable) and removed when the server exits."""
    if workers <= 1 or os.environ.get(MULTIPROC_ENV):
        yield
        return
    path = tempfile.mkdtemp(prefix="secure-ws-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield
    finally:
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(path, ignore_errors=True)


MULTIPROC_DIR = _multiprocess_directory()

# prometheus-client picks its value storage when its module is first imported; an application may have
# imported it before us, so choose explicitly (before any metric of ours exists).
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values  # noqa: E402
from prometheus_client import multiprocess as _multiprocess  # noqa: E402
from prometheus_client.exposition import CONTENT_TYPE_LATEST  # noqa: E402
from prometheus_client.metrics_core import GaugeMetricFamily, Metric  # noqa: E402
from prometheus_client.process_collector import ProcessCollector  # noqa: E402

if MULTIPROC_DIR is not None and not getattr(values.ValueClass, "_multiprocess", False):
    values.ValueClass = values.MultiProcessValue()

# Our own registry, so several apps in one process (tests) and an application's own metrics never collide.
REGISTRY = CollectorRegistry(auto_describe=True)


# -- the metrics -------------------------------------------------------------------------------------

CONNECTIONS = Gauge(
    "secure_ws_connections_active", "Open authenticated WebSocket connections", registry=REGISTRY, multiprocess_mode="livesum"
)
HANDSHAKES = Counter("secure_ws_handshakes_total", "WebSocket handshakes by result", ["result"], registry=REGISTRY)
CLOSES = Counter(
    "secure_ws_closes_total", "Connections closed by the server, by close code and reason", ["code", "reason"], registry=REGISTRY
)
MESSAGES = Counter("secure_ws_messages_total", "Inbound frames on authenticated connections", registry=REGISTRY)
RATE_LIMITED = Counter("secure_ws_rate_limited_total", "Inbound frames refused by the rate limit", registry=REGISTRY)
DELIVERIES = Counter(
    "secure_ws_deliveries_total", "Publications and pushes handed to a connection (one per receiving connection)", registry=REGISTRY
)
PUBLISHES = Counter(
    "secure_ws_publishes_total", "Publications sent to storage (clients' publish frames and the application's publish)", registry=REGISTRY
)
STORAGE_ERRORS = Counter("secure_ws_storage_errors_total", "Shared-storage (Redis) calls that failed, by operation", ["op"], registry=REGISTRY)
STORAGE_SECONDS = Histogram(
    "secure_ws_storage_seconds",
    "Shared-storage (Redis) call latency, by operation",
    ["op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0),
    registry=REGISTRY,
)
STORAGE_UP = Gauge(
    "secure_ws_storage_up", "1 if shared storage answered the last ping (every 5 s), else 0; the lowest of all workers",
    registry=REGISTRY, multiprocess_mode="livemin",
)
PUBSUB_UP = Gauge(
    "secure_ws_storage_pubsub_up",
    "1 if this worker's Redis pub/sub connection answered its last ping (a silent one is re-established within "
    "seconds), else 0; the lowest of all workers", registry=REGISTRY, multiprocess_mode="livemin",
)
KEYRING_RELOADS = Counter(
    "secure_ws_keyring_reloads_total", "Verification-key reloads by source (file, url) and result (ok, error)",
    ["source", "result"], registry=REGISTRY,
)
for _source in ("file", "url"):  # every series present from the start, at 0: rate() and alerts see the first one
    for _result in ("ok", "error"):
        KEYRING_RELOADS.labels(source=_source, result=_result)
KEYRING_KEYS = Gauge(
    "secure_ws_keyring_keys", "Verification keys in use (the lowest of all workers)", registry=REGISTRY, multiprocess_mode="livemin"
)
REVOCATIONS_CHECKED = Gauge(
    "secure_ws_revocations_checked_timestamp_seconds",
    "When this worker last confirmed its revocation list against every source (Redis, the file); the oldest "
    "of all workers. time() minus this bounds how late a revocation can be applied",
    registry=REGISTRY, multiprocess_mode="livemin",
)
REVOCATIONS_ACTIVE = Gauge(
    "secure_ws_revocations_active", "Revocation entries (jti and sub) in force", registry=REGISTRY, multiprocess_mode="livemax"
)
HANDSHAKE_SECONDS = Histogram(
    "secure_ws_handshake_seconds",
    "Time to authenticate a handshake",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
    registry=REGISTRY,
)
FRAME_SECONDS = Histogram(
    "secure_ws_frame_seconds",
    "Time to handle one accepted inbound frame (parse, dispatch, reply), sampled 1 in 8",
    buckets=(0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
    registry=REGISTRY,
)


# -- the hot path: plain numbers, flushed --------------------------------------------------------------


class Stats:
    """Per-frame counters as plain integers: an attribute increment instead of a locked (and, with
    workers, memory-mapped) ``Counter.inc`` on the hot path; moved into the counters by :func:`flush`."""

    __slots__ = ("messages", "rate_limited", "deliveries", "publishes")

    def __init__(self) -> None:
        self.messages = 0
        self.rate_limited = 0
        self.deliveries = 0
        self.publishes = 0


STATS = Stats()
_STATS_COUNTERS = (("messages", MESSAGES), ("rate_limited", RATE_LIMITED), ("deliveries", DELIVERIES), ("publishes", PUBLISHES))


class Timings:
    """A histogram's observations as plain numbers (a bucket index and two additions, no lock), moved
    into the prometheus histogram by :meth:`flush`. ``errors`` counts failed calls, for ``_errors``."""

    __slots__ = ("_bounds", "_counts", "_sum", "_target", "_errors", "errors")

    def __init__(self, histogram: Histogram, errors: Counter | None = None) -> None:
        # prometheus-client's Histogram keeps its bounds, one value per bucket and the sum in these
        # attributes (unchanged since its first releases); tests/test_metrics.py checks the exposition.
        self._target = histogram
        self._bounds: list[float] = histogram._upper_bounds
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._errors = errors
        self.errors = 0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(self._bounds, seconds)] += 1  # the first bucket whose bound is >= seconds
        self._sum += seconds

    def flush(self) -> None:
        counts, target = self._counts, self._target
        for index, count in enumerate(counts):
            if count:
                counts[index] = 0
                target._buckets[index].inc(count)
        if self._sum:
            target._sum.inc(self._sum)
            self._sum = 0.0
        if self.errors and self._errors is not None:
            self._errors.inc(self.errors)
            self.errors = 0


FRAMES = Timings(FRAME_SECONDS)
HANDSHAKE = Timings(HANDSHAKE_SECONDS)
STORAGE_OPS = ("rate_limit", "connection_slot", "publish", "signal", "subscribe", "revocations", "ping")
STORAGE = {op: Timings(STORAGE_SECONDS.labels(op=op), STORAGE_ERRORS.labels(op=op)) for op in STORAGE_OPS}


async def timed(op: str, call: Any) -> Any:
    """``await timed("publish", redis.publish(...))``: its latency into ``secure_ws_storage_seconds{op}``,
    a failure into ``secure_ws_storage_errors_total{op}`` (and raised on)."""
    timings = STORAGE[op]
    started = perf_counter()
    try:
        return await call
    except Exception:
        timings.errors += 1
        raise
    finally:
        timings.observe(perf_counter() - started)


# -- the rest: called where something rare happens ----------------------------------------------------

_CLOSE_CODES = frozenset(int(code) for code in closes.Close)
_CLOSE_REASONS = frozenset(
    value for name, value in vars(closes).items() if name.isupper() and isinstance(value, str)
)


def closed(code: int, reason: str) -> None:
    """``secure_ws_closes_total{code, reason}``: the reason as snake_case, e.g. ``slow_consumer``."""
    CLOSES.labels(
        code=str(code) if code in _CLOSE_CODES else "other",
        reason=reason.replace(" ", "_") if reason in _CLOSE_REASONS else ("none" if not reason else "other"),
    ).inc()


def flush() -> None:
    """Move this process's plain-number counts into the prometheus metrics (shared files with workers)."""
    for name, counter in _STATS_COUNTERS:
        count = getattr(STATS, name)
        if count:
            setattr(STATS, name, 0)
            counter.inc(count)
    FRAMES.flush()
    HANDSHAKE.flush()
    for timings in STORAGE.values():
        timings.flush()


async def flush_every(interval: float = FLUSH_INTERVAL) -> None:
    """Background task of each worker; flushes a last time when cancelled (the worker stopping)."""
    try:
        while True:
            await asyncio.sleep(interval)
            flush()
    finally:
        flush()
        if MULTIPROC_DIR is not None:
            # This worker's gauges leave the sums; its counters stay in the totals.
            _multiprocess.mark_process_dead(os.getpid(), MULTIPROC_DIR)


# -- exposition ------------------------------------------------------------------------------------------


def _version() -> str:
    from . import __version__

    return __version__


class _BuildInfo:
    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("secure_ws_build_info", "Always 1: the running version", labels=["version", "python"])
        info.add_metric([_version(), platform.python_version()], 1)
        yield info


def _worker_pids(path: str) -> list[str]:
    """The pids of the workers writing to ``path`` (each has a live-gauge file); a worker that died without
    stopping (killed) is marked dead here, so its gauges leave the sums."""
    pids = set()
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid = name.rsplit("_", 1)[1][:-3]
        if pid.isdigit():
            pids.add(pid)
    alive = []
    for pid in sorted(pids, key=int):
        if _start_ticks(int(pid)) is None:
            _multiprocess.mark_process_dead(pid, path)
        else:
            alive.append(pid)
    return alive


class _WorkerProcesses:
    """The standard ``process_*`` metrics for every live worker, read from /proc at scrape time, with a
    ``pid`` label: prometheus-client's process collector reports only the process it runs in."""

    pids: list[str] = []  # set by exposition() before each scrape

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for pid in self.pids:
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in collector.collect():
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                merged.samples += [sample._replace(labels={**sample.labels, "pid": pid}) for sample in family.samples]
        yield from families.values()


def _multiprocess_registry(path: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry, path=path)
    registry.register(_WORKERS)
    registry.register(_BuildInfo())
    return registry


_WORKERS = _WorkerProcesses()
if MULTIPROC_DIR is None:
    ProcessCollector(registry=REGISTRY)
    REGISTRY.register(_BuildInfo())
    _SCRAPED = REGISTRY
else:
    _SCRAPED = _multiprocess_registry(MULTIPROC_DIR)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text for ``/metrics``: every worker's, from any process of the run (a worker, or the
    ``secure-ws serve`` parent inside :func:`run_directory`), else this process's own."""
    flush()
    path = MULTIPROC_DIR or os.environ.get(MULTIPROC_ENV)
    if path is None:
        return generate_latest(_SCRAPED), CONTENT_TYPE_LATEST
    _WORKERS.pids = _worker_pids(path)  # before the files are read: a killed worker's gauges go
    registry = _SCRAPED if MULTIPROC_DIR is not None else _multiprocess_registry(path)
    return generate_latest(registry), CONTENT_TYPE_LATEST
