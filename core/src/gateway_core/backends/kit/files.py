"""A cluster's private files on the gateway's host: TLS files, logs, and reading logs back.

Owns `open_directory` (an fd of a directory checked to be a real directory of its owner),
`write_private_file`, `create_log`, `tail_log` (failure reasons) and `read_log` (the logs
route), all refusing symlinks, so a user who owns a
cluster's directory cannot make the gateway read or write elsewhere through it.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .accounts import RunAs

TAIL_LINES = 20
"""Lines of a log `tail_log` returns by default (failure reasons show them to users)."""

_TAIL_BYTES = 64 * 1024
_LINE_CHARS = 500


def _owner(run_as: RunAs | None) -> int:
    return os.geteuid() if run_as is None else run_as.uid


def open_directory(path: str | os.PathLike[str], *, run_as: RunAs | None = None) -> int:
    """An fd (close it) of the directory ``path``, checked to be a real directory (not a
    symlink) owned by ``run_as`` (default: the gateway's user). Raises OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    owner = _owner(run_as)
    if os.fstat(fd).st_uid != owner:
        os.close(fd)
        raise PermissionError(f"{os.fspath(path)} is not owned by uid {owner}")
    return fd


def write_private_file(
    path: str | os.PathLike[str], data: bytes, *, run_as: RunAs | None = None
) -> None:
    """Create ``path`` (it must not exist; never through a symlink) with mode 0600, owned by
    ``run_as`` when given, holding ``data``: a TLS key or certificate."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        if run_as is not None:
            os.fchown(f.fileno(), run_as.uid, run_as.gid)
        f.write(data)


def create_log(directory: str | os.PathLike[str], name: str, *, run_as: RunAs | None = None) -> int:
    """Create the log file ``name`` in ``directory`` (checked with `open_directory`; the file
    must not exist) with mode 0600, owned by ``run_as`` when given, and return an fd open for
    appending: hand it to `ProcessGroups.start` as ``stdout``, then close it."""
    dir_fd = open_directory(directory, run_as=run_as)
    try:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_APPEND | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
    finally:
        os.close(dir_fd)
    if run_as is not None:
        os.fchown(fd, run_as.uid, run_as.gid)
    return fd


def _open_log(directory: str | os.PathLike[str], name: str, run_as: RunAs | None) -> int | None:
    """An fd of the regular file ``name`` in ``directory`` owned by ``run_as`` (no symlinks),
    or None."""
    try:
        dir_fd = open_directory(directory, run_as=run_as)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != _owner(run_as):
        os.close(fd)
        return None
    return fd


def tail_log(
    directory: str | os.PathLike[str],
    name: str,
    *,
    run_as: RunAs | None = None,
    lines: int = TAIL_LINES,
) -> list[str] | None:
    """The last ``lines`` non-blank lines of the log ``name`` in ``directory`` (each cut to 500
    characters); None when it cannot be read safely: missing, a symlink, not a regular file, or
    the file or directory not owned by ``run_as`` (default: the gateway's user)."""
    fd = _open_log(directory, name, run_as)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL_BYTES))
        text = f.read().decode("utf-8", "replace")
    found = [line[:_LINE_CHARS] for line in text.splitlines() if line.strip()]
    return found[-lines:] if lines > 0 else []


def last_lines(text: str, lines: int, *, cut: bool = False) -> str:
    """The last ``lines`` lines of ``text`` as they are (blank lines kept). With ``cut``
    (``text`` is the end of a longer file), its first line, likely partial, is dropped."""
    found = text.splitlines()
    if cut and found:
        found = found[1:]
    return "\n".join(found[-lines:]) if lines > 0 else ""


def read_log(
    directory: str | os.PathLike[str],
    name: str,
    *,
    run_as: RunAs | None = None,
    lines: int,
    max_bytes: int,
) -> str | None:
    """The last ``lines`` lines of the log ``name`` in ``directory``, from at most its last
    ``max_bytes`` bytes; None when it cannot be read safely (as `tail_log`)."""
    fd = _open_log(directory, name, run_as)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - max_bytes))
        data = f.read(max_bytes)
    return last_lines(data.decode("utf-8", "replace"), lines, cut=size > max_bytes)
