"""Small file helpers shared by the ops commands and the server's reloaders.

Writers replace files atomically (write a temporary file in the same folder,
fsync, rename) so that a server polling the file never reads half of it, and
read-modify-write cycles hold an exclusive lock so two ops commands run at once
do not lose each other's change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        # os.open's mode is filtered by the umask; the key files must be exactly `mode`.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, document: Any, mode: int = 0o600) -> None:
    atomic_write(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        if default is None:
            raise
        return default
    return json.loads(text)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<path>.lock`` for a read-modify-write of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def change_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file changes: inode (atomic writes give a new one even within one mtime
    tick), mtime, size, and ``ctime``, so an in-place edit that keeps size and mtime (``utime``
    restores mtime, never ctime) still shows. One ``stat``, so cheap to poll however large the file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns


def fingerprint(path: Path) -> tuple[int, int, int] | None:
    """:func:`change_stamp` without ``ctime``: what the key-file watcher compares (see its SIGHUP test)."""
    stamp = change_stamp(path)
    return None if stamp is None else stamp[:3]
