"""The launcher job-queue drivers run as the requesting user: one JSON request in, one out.

``python -m gateway_core.backends.jobqueue_launcher`` (or the ``gateway-jobqueue-launcher``
script) reads one JSON object on stdin, does what it asks as whoever runs it, and prints one
JSON object on stdout. The gateway runs it as the user, through ``sudo -n -H -u <user>`` or,
when the gateway is root, as a child with the user's uid, gid and groups; so everything it
touches (the staging directory, the files in it, the jobs it submits) is the user's, checked by
the kernel and the batch system rather than by the gateway. Standard library only; it imports
nothing of the gateway beyond its package.

Requests (``env`` is the environment of the command; the launcher adds the user's ``HOME``,
``USER``, ``LOGNAME`` and ``SHELL``; ``timeout`` is in seconds):

- ``{"action": "submit", "staging_dir": "/home/u/.dask-gateway/abc", "files": {"dask.pem":
  {"data": "...", "mode": 384}}, "cmd": ["sbatch", ...], "stdin": "#!/bin/sh ...",
  "env": {...}, "timeout": 60}``: create the staging directory (0700; its parent too if
  missing; an existing directory is refused), write the files with their modes (never through
  a symlink, never over an existing file), then run ``cmd`` in the staging directory with
  ``stdin``. ``staging_dir`` and ``files`` are optional.
- ``{"action": "run", "cmd": [...] or null, "env": {...}, "remove": "/path/or/null"}``: run
  ``cmd`` (e.g. a cancel) in the user's home, then remove the directory ``remove`` if given.
- ``{"action": "tail", "path": "...", "max_bytes": 65536}``: the end of a file.

Answers: ``{"ok": true, "returncode": 0, "stdout": "...", "stderr": "..."}`` (for ``run``, also
``"remove_error"`` when the removal failed; for ``tail``, ``"text"``), or ``{"ok": false,
"error": "..."}`` when the request could not be carried out. The exit status is 0 whenever a
JSON answer was printed.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from typing import Any

MAX_OUTPUT = 64 * 1024
"""Bytes of a command's stdout and stderr kept in the answer (the end of each)."""


class RequestError(Exception):
    """The request cannot be carried out; the message is the answer's ``error``."""


def _identity() -> dict[str, str]:
    entry = pwd.getpwuid(os.getuid())
    return {
        "HOME": entry.pw_dir,
        "USER": entry.pw_name,
        "LOGNAME": entry.pw_name,
        "SHELL": entry.pw_shell or "/bin/sh",
    }


def _text(data: bytes) -> str:
    return data[-MAX_OUTPUT:].decode("utf-8", "replace")


def _run(req: dict[str, Any], cwd: str) -> dict[str, Any]:
    cmd = req.get("cmd")
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise RequestError("cmd must be a non-empty list of strings")
    env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
    env.update(_identity())
    stdin = req.get("stdin")
    timeout = req.get("timeout")
    try:
        proc = subprocess.run(
            cmd,
            input=stdin.encode() if isinstance(stdin, str) else None,
            stdin=None if isinstance(stdin, str) else subprocess.DEVNULL,
            capture_output=True,
            env=env,
            cwd=cwd,
            timeout=float(timeout) if timeout else None,
            check=False,
        )
    except FileNotFoundError:
        raise RequestError(f"command not found: {cmd[0]!r}") from None
    except subprocess.TimeoutExpired:
        raise RequestError(f"{cmd[0]} did not finish within {timeout} s") from None
    except OSError as exc:
        raise RequestError(f"cannot run {cmd[0]!r}: {exc}") from None
    return {
        "ok": True,
        "returncode": proc.returncode,
        "stdout": _text(proc.stdout),
        "stderr": _text(proc.stderr),
    }


def _home_or_root() -> str:
    home = _identity()["HOME"]
    return home if os.path.isdir(home) else "/"


def _make_staging(staging_dir: str, files: dict[str, Any]) -> None:
    if not os.path.isabs(staging_dir):
        raise RequestError(f"staging directory {staging_dir!r} is not an absolute path")
    parent = os.path.dirname(staging_dir.rstrip("/"))
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.mkdir(staging_dir, 0o700)
    except FileExistsError:
        raise RequestError(f"staging directory {staging_dir} already exists") from None
    except OSError as exc:
        raise RequestError(f"cannot create staging directory {staging_dir}: {exc}") from None
    try:
        os.chmod(staging_dir, 0o700)
        dir_fd = os.open(staging_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for name, spec in files.items():
                if "/" in name or name in ("", ".", ".."):
                    raise RequestError(f"bad file name {name!r}")
                mode = int(spec.get("mode", 0o600)) & 0o777
                fd = os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    mode,
                    dir_fd=dir_fd,
                )
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), mode)
                    f.write(str(spec.get("data", "")).encode())
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        shutil.rmtree(staging_dir, ignore_errors=True)
        if isinstance(exc, RequestError):
            raise
        if isinstance(exc, OSError):
            raise RequestError(f"cannot write to staging directory {staging_dir}: {exc}") from None
        raise


def submit(req: dict[str, Any]) -> dict[str, Any]:
    staging_dir = req.get("staging_dir")
    cwd = _home_or_root()
    if staging_dir:
        _make_staging(str(staging_dir), dict(req.get("files") or {}))
        cwd = str(staging_dir)
    return _run(req, cwd)


def run(req: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": True, "returncode": 0, "stdout": "", "stderr": ""}
    if req.get("cmd"):
        answer = _run(req, _home_or_root())
    remove = req.get("remove")
    if remove:
        path = str(remove)
        if not os.path.isabs(path) or os.path.realpath(path) in ("/", _identity()["HOME"]):
            raise RequestError(f"refusing to remove {path!r}")
        try:
            if os.path.islink(path):
                os.unlink(path)
            else:
                shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            answer["remove_error"] = f"cannot remove {path}: {exc}"
    return answer


def tail(req: dict[str, Any]) -> dict[str, Any]:
    path = str(req.get("path") or "")
    max_bytes = int(req.get("max_bytes") or MAX_OUTPUT)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise RequestError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - max_bytes))
        data = f.read(max_bytes)
    return {"ok": True, "text": data.decode("utf-8", "replace")}


ACTIONS = {"submit": submit, "run": run, "tail": tail}


def handle(raw: bytes) -> dict[str, Any]:
    """The answer to one raw request."""
    try:
        req = json.loads(raw)
    except ValueError as exc:
        return {"ok": False, "error": f"the request is not JSON: {exc}"}
    if not isinstance(req, dict):
        return {"ok": False, "error": "the request must be a JSON object"}
    action = ACTIONS.get(str(req.get("action")))
    if action is None:
        return {"ok": False, "error": f"unknown action {req.get('action')!r}"}
    try:
        return action(req)
    except RequestError as exc:
        return {"ok": False, "error": str(exc)}


def main() -> int:
    os.umask(0o077)
    answer = handle(sys.stdin.buffer.read())
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
