"""Worker processes: what uvicorn's multi-process supervisor gets wrong for secure_ws, and how an
application learns, at import, how it is being run.

uvicorn's supervisor (``--workers N``):

* restarts every worker on SIGHUP, which closes every connection (1012). ``secure-ws serve`` uses
  :class:`Supervisor`, which forwards SIGHUP to the workers instead: each reloads its keys,
  revocations and whatever else registered a reload (``Service.on_reload``), and keeps its connections;
* restarts a worker that exits during start-up forever, unless it exits with uvicorn's
  ``STARTUP_FAILURE`` code (3), so a configuration mistake loops. :func:`startup_failure_code` is the
  code the app exits with in a worker, which stops uvicorn's supervisor (plain ``uvicorn --workers``)
  and makes :class:`Supervisor` end ``secure-ws serve`` with exit code 2.

:func:`running_config` finds the uvicorn ``Config`` that is importing the application, so that the
app can refuse ``--workers`` > 1 with ``memory://`` under plain uvicorn too.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Iterator

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess

log = logging.getLogger("uvicorn.error")

CONFIG_ERROR = 2  # what a single process exits with on a configuration mistake


def running_config() -> Config | None:
    """The uvicorn ``Config`` up the call stack (uvicorn is importing the app), or None (imported
    some other way: a test, a host application, a script)."""
    frame = sys._getframe(1)
    while frame is not None:
        for name in ("self", "config"):
            candidate = frame.f_locals.get(name)
            if isinstance(candidate, Config):
                return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def running_workers() -> int:
    """How many worker processes the uvicorn running this app starts (1 when not run by uvicorn)."""
    config = running_config()
    if config is None or config.should_reload:
        return 1
    return max(1, config.workers)


def running_port() -> int | None:
    """The TCP port the uvicorn running this app binds (``--port``), or None (not run by uvicorn, or on a
    socket it was handed: ``--fd``, ``--uds``)."""
    config = running_config()
    if config is None or config.fd is not None or config.uds is not None:
        return None
    return config.port


def startup_failure_code() -> int:
    """The exit code for a configuration mistake: uvicorn's ``STARTUP_FAILURE`` in a worker process of
    a supervisor (which then stops instead of restarting the worker forever), else 2."""
    if multiprocessing.parent_process() is not None and running_config() is not None:
        return STARTUP_FAILURE
    return CONFIG_ERROR


@contextlib.contextmanager
def _hup_blocked() -> Iterator[None]:
    """Workers start with SIGHUP blocked (the signal mask survives multiprocessing's spawn): a HUP that
    arrives before a worker's app has installed its handler waits, pending, instead of killing the
    worker (SIGHUP's default action); the app's lifespan unblocks it once its handler is in place."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Supervisor(Multiprocess):
    """uvicorn's supervisor with SIGHUP forwarded to the workers and a failed start remembered."""

    failed = False

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)  # installs the handlers (SIGHUP's queues a forward)
        # `secure-ws` holds SIGHUP from its first line (secure_ws.cli): a HUP sent meanwhile arrives now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    # Every place uvicorn's supervisor starts a worker.
    def init_processes(self) -> None:
        with _hup_blocked():
            super().init_processes()

    def handle_ttin(self) -> None:
        with _hup_blocked():
            super().handle_ttin()

    def handle_hup(self) -> None:
        log.info("Received SIGHUP, forwarding it to the workers (they reload keys and revocations; no restart)")
        for process in self.processes:
            if process.pid is not None and process.exitcode is None:
                try:
                    os.kill(process.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass  # it just died; keep_subprocess_alive handles that

    def keep_subprocess_alive(self) -> None:
        if any(p.exitcode == STARTUP_FAILURE for p in self.processes):
            self.failed = True  # uvicorn's own check below stops every worker and the loop
        with _hup_blocked():
            super().keep_subprocess_alive()
