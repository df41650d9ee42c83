"""Small file helpers shared by the ops commands and the server's reloaders.

Writers replace files atomically (write a temporary file in the same folder,
fsync, rename) so that a server polling the file never reads half of it, and
read-modify-write cycles hold an exclusive lock so two ops commands run at once
do not lose each other's change.

Files the server trusts (the JWK Set, the API keys, the revocations, ``.env``)
are read by :func:`read_trusted`: bounded in size, and refused when someone
other than their owner may change them (OpenSSH's rule for its key files).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class UntrustedFile(ValueError):
    """A trust file that must not be used as it is: larger than its bound, or writable by others."""


def shown(path: Path | str) -> str:
    """A path as errors name it: absolute, so that a relative default (``certs/jwks.json``) says where it was looked for."""
    return os.path.abspath(path)


def _private_group(gid: int, owner: int) -> bool:
    """Whether ``gid`` is its owner's own group and nobody else's (a "user private group", as Debian
    and Fedora give every user, where a umask of 002 makes files group-writable harmlessly)."""
    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(owner)
    except KeyError:
        return False
    members = set(group.gr_mem)
    if not members <= {user.pw_name} or not (user.pw_gid == gid or members == {user.pw_name}):
        return False
    # Nobody else has it as their primary group (SUSE's `users` is everyone's). Only asked of a
    # group-writable file, which is rare, so walking the user database costs nothing in the common case.
    return not any(other.pw_gid == gid and other.pw_uid != owner for other in pwd.getpwall())


def _others_may_write(st: os.stat_result) -> bool:
    if st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and not _private_group(st.st_gid, st.st_uid)


def _untrusted_folder(folder: str) -> str | None:
    """Why a folder lets others swap the file in it, or None. A sticky folder (``/tmp``, a Kubernetes
    Secret volume's root) lets each user rename only their own entries, so it is safe however writable."""
    st = os.stat(folder)
    if _others_may_write(st) and not st.st_mode & stat.S_ISVTX:
        return f"its folder {folder} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); use chmod go-w"
    return None


def read_trusted(path: Path, limit: int) -> bytes:
    """The bytes of a file the server trusts. FileNotFoundError (or another OSError) when it cannot be
    opened; :class:`UntrustedFile` when it is not a regular file, is larger than ``limit`` (at most
    ``limit + 1`` bytes are read), or when a user other than its owner may change it: the file itself
    group- or world-writable, or the folder it is named in, or the folder it really is in (symbolic
    links, such as Kubernetes' ``..data`` ones, are followed), writable by others and not sticky.
    Owners are not checked: a Secret mounted read-only and owned by root is what a container gets."""
    # O_NONBLOCK: a FIFO put in the file's place would otherwise block the open until someone writes to it.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as fh:
        st = os.fstat(fh.fileno())  # the very file read, not a name that could be swapped meanwhile
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFile("not a regular file")
        if _others_may_write(st):
            raise UntrustedFile(f"writable by others (mode {stat.S_IMODE(st.st_mode):o}): refused, as OpenSSH refuses such key files; use chmod go-w")
        named, real = os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))
        for folder in dict.fromkeys((named, real)):
            problem = _untrusted_folder(folder)
            if problem is not None:
                raise UntrustedFile(problem)
        data = fh.read(limit + 1)  # bound: limit + 1 bytes, whatever the file's size
    if len(data) > limit:
        raise UntrustedFile(f"larger than {limit} bytes")
    return data


def make_parent(path: Path) -> None:
    """The folder of a file this package writes, made if missing with no write right for others whatever
    the umask (a folder others may write would make the file untrusted, see :func:`read_trusted`)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    make_parent(path)
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


def json_bytes(document: Any) -> bytes:
    """A document as :func:`write_json` writes it."""
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def write_json(path: Path, document: Any, mode: int = 0o600) -> None:
    atomic_write(path, json_bytes(document), mode)


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
    make_parent(path)
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
