"""Tests of the driver kit (`gateway_core.backends.kit`) on real short-lived processes and files.

Covers /proc parsing, the pid-reuse guard, stopping with escalation, the log helpers, the
account lookup's refusals, and the environment a cluster's processes get.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway_core.backends import kit
from gateway_core.backends.kit import (
    ProcessGroups,
    ProcessRef,
    RunAs,
    cluster_env,
    create_log,
    describe_exit,
    last_lines,
    lookup_user,
    read_log,
    read_stat,
    tail_log,
    tls_env,
    with_gateway_bin,
    write_private_file,
)
from gateway_core.config import load_config
from gateway_core.context import GatewayContext
from gateway_core.models import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_process_left_behind")]

IGNORES_SIGINT = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); " + (
    "print('ready', flush=True); time.sleep(60)"
)


@pytest.fixture
def groups() -> ProcessGroups:
    """A `ProcessGroups` of the test's own (``no_process_left_behind`` checks nothing of what
    it started outlives the test)."""
    return ProcessGroups()


def start(groups: ProcessGroups, tmp_path: Path, code: str, log: str = "out.log") -> ProcessRef:
    fd = create_log(tmp_path, log)
    try:
        return groups.start(
            [sys.executable, "-c", code], env=dict(os.environ), cwd=tmp_path, stdout=fd
        )
    finally:
        os.close(fd)


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------------------------
# /proc


def test_read_stat_survives_a_command_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    odd = tmp_path / "a b) (c"
    odd.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(odd), "30"])
    try:
        st = read_stat(proc.pid)
        assert st is not None
        assert (st.pid, st.ppid, st.state in "RSD", st.running) == (
            proc.pid,
            os.getpid(),
            True,
            True,
        )
        assert st.start_ticks > 0
        me = read_stat("self")
        assert me is not None and me.pid == os.getpid()
    finally:
        proc.kill()
        proc.wait()
    assert read_stat(proc.pid) is None


def test_describe_exit_names_codes_and_signals() -> None:
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)"
    assert describe_exit(None) == "exited"


# --------------------------------------------------------------------------------------------
# ProcessRef and ProcessGroups


async def test_a_reused_pid_is_neither_alive_nor_signalled(
    groups: ProcessGroups, tmp_path: Path
) -> None:
    real = start(groups, tmp_path, "import time; time.sleep(60)")
    assert ProcessRef.from_state(real.to_state()) == real
    assert ProcessRef.of(real.pid) == real
    later = ProcessRef(pid=real.pid, start_ticks=real.start_ticks - 1, boot_id=real.boot_id)
    other_boot = ProcessRef(pid=real.pid, start_ticks=real.start_ticks, boot_id="another")
    assert groups.alive(real) and groups.group_alive(real)
    for impostor in (later, other_boot):
        assert impostor.reused()
        assert not groups.alive(impostor) and not groups.group_alive(impostor)
        groups.signal(impostor, signal.SIGKILL)
        assert await groups.terminate(impostor, [(signal.SIGKILL, 1.0)], what="impostor")
    assert groups.alive(real), "a reference to another process must not signal this one"
    assert await groups.terminate(real, [(signal.SIGTERM, 5.0)], what="test")


async def test_terminate_escalates_past_a_process_that_ignores_sigint(
    groups: ProcessGroups, tmp_path: Path
) -> None:
    ref = start(groups, tmp_path, IGNORES_SIGINT)
    await until(lambda: "ready" in (tmp_path / "out.log").read_text())
    began = time.monotonic()
    gone = await groups.terminate(
        ref, [(signal.SIGINT, 0.5), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)], what="test"
    )
    assert gone
    assert time.monotonic() - began >= 0.5, "SIGINT's timeout was waited for"
    assert not groups.alive(ref)
    assert groups.exit_status(ref) is None, "forgotten once stopped"


async def test_terminate_waits_for_the_whole_group(groups: ProcessGroups, tmp_path: Path) -> None:
    # The leader exits on SIGTERM at once; the child it started ignores SIGTERM.
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        'print(\\"child\\", flush=True); time.sleep(60)\'])\n'
        "time.sleep(60)\n"
    )
    ref = start(groups, tmp_path, code)
    await until(lambda: "child" in (tmp_path / "out.log").read_text())
    assert await groups.terminate(
        ref, [(signal.SIGTERM, 0.3), (signal.SIGKILL, 5.0)], what="test", group=True
    )
    assert not groups.group_alive(ref)
    assert kit.group_members(ref.pid) == []


async def test_an_exit_is_seen_with_its_status(groups: ProcessGroups, tmp_path: Path) -> None:
    ref = start(groups, tmp_path, "import sys; print('bye'); sys.exit(3)")
    await until(lambda: not groups.alive(ref))
    assert groups.exit_status(ref) == 3
    assert not groups.group_alive(ref)


async def test_a_process_started_by_another_gateway_is_watched_and_stopped_as_adopted(
    groups: ProcessGroups, tmp_path: Path
) -> None:
    ref = start(groups, tmp_path, "import time; time.sleep(60)")
    adopter = ProcessGroups()  # as made by a restarted gateway: it never started the process
    assert groups.started_here(ref) and not adopter.started_here(ref)
    assert adopter.alive(ref) and adopter.group_alive(ref)
    assert await adopter.terminate(ref, [(signal.SIGTERM, 5.0)], what="adopted")
    assert not adopter.alive(ref)
    assert adopter.exit_status(ref) is None  # not its child: the status is not its to know
    assert groups.exit_status(ref) == -signal.SIGTERM


def test_a_missing_program_fails_with_its_name(groups: ProcessGroups, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="cannot run 'gw-no-such-program'"):
        groups.start(["gw-no-such-program"], env={"PATH": "/usr/bin"}, cwd=tmp_path, stdout=1)


# --------------------------------------------------------------------------------------------
# Files


def test_tail_log_gives_the_last_lines_and_refuses_symlinks(tmp_path: Path) -> None:
    fd = create_log(tmp_path, "a.log")
    os.write(fd, b"".join(f"line {i}\n\n".encode() for i in range(30)))
    os.close(fd)
    assert tail_log(tmp_path, "a.log", lines=3) == ["line 27", "line 28", "line 29"]
    assert len(tail_log(tmp_path, "a.log") or []) == 20
    (tmp_path / "link.log").symlink_to(tmp_path / "a.log")
    assert tail_log(tmp_path, "link.log") is None
    assert tail_log(tmp_path, "missing.log") is None
    (tmp_path / "linked-dir").symlink_to(tmp_path)
    assert tail_log(tmp_path / "linked-dir", "a.log") is None
    with pytest.raises(FileExistsError):
        create_log(tmp_path, "a.log")  # never appends to someone else's file


def test_read_log_gives_the_end_as_it_is_within_a_byte_bound(tmp_path: Path) -> None:
    fd = create_log(tmp_path, "a.log")
    os.write(fd, b"".join(f"line {i}\n\n".encode() for i in range(30)))
    os.close(fd)
    # Blank lines kept (they are part of the output), lines counted from the end.
    assert read_log(tmp_path, "a.log", lines=3, max_bytes=10_000) == "\nline 29\n"
    assert read_log(tmp_path, "a.log", lines=4, max_bytes=10_000) == "line 28\n\nline 29\n"
    # A byte bound smaller than the file starts at a whole line.
    assert read_log(tmp_path, "a.log", lines=100, max_bytes=12) == "\nline 29\n"
    assert read_log(tmp_path, "a.log", lines=0, max_bytes=100) == ""
    (tmp_path / "link.log").symlink_to(tmp_path / "a.log")
    assert read_log(tmp_path, "link.log", lines=5, max_bytes=100) is None
    assert read_log(tmp_path, "missing.log", lines=5, max_bytes=100) is None
    assert last_lines("a\nb\nc", 2) == "b\nc"
    assert last_lines("rtial\nb\nc", 5, cut=True) == "b\nc"


def test_private_files_are_0600_and_never_overwritten(tmp_path: Path) -> None:
    write_private_file(tmp_path / "dask.pem", b"key")
    assert (tmp_path / "dask.pem").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_private_file(tmp_path / "dask.pem", b"other")
    assert (tmp_path / "dask.pem").read_bytes() == b"key"


# --------------------------------------------------------------------------------------------
# Accounts


def test_lookup_user_refuses_unknown_users_and_root() -> None:
    with pytest.raises(RuntimeError) as info:
        lookup_user("gw-no-such-user-x", purpose="so nothing was started")
    assert str(info.value) == (
        "User 'gw-no-such-user-x' has no account on the gateway's host; so nothing was started"
    )
    root = pwd.getpwuid(0).pw_name
    with pytest.raises(RuntimeError, match=f"User '{root}' is root; the gateway does not run"):
        lookup_user(root, purpose="unused")


def test_an_account_names_itself_in_the_identity_variables() -> None:
    me = RunAs.from_pwd(pwd.getpwuid(os.getuid()))
    assert me.identity_env() == {
        "HOME": me.home,
        "USER": me.name,
        "LOGNAME": me.name,
        "SHELL": me.shell,
    }
    assert os.getgid() in me.groups


# --------------------------------------------------------------------------------------------
# Environment


def test_cluster_env_puts_the_gateways_variables_over_the_configs() -> None:
    context = GatewayContext(config=load_config({}, environ={}), hook=None)
    context.api_url = "http://gw:8000/api"
    cluster = Cluster(
        name="c1",
        username="alice",
        token="tok",
        config={"environment": {"FOO": "bar", "DASK_GATEWAY_API_TOKEN": "forged", "N": 3}},
    )
    assert cluster_env(cluster, context) == {
        "FOO": "bar",
        "N": "3",
        "DASK_GATEWAY_API_URL": "http://gw:8000/api",
        "DASK_GATEWAY_API_TOKEN": "tok",
        "DASK_GATEWAY_CLUSTER_NAME": "c1",
    }
    assert tls_env("worker", "/d/c.crt", "/d/c.pem") == {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": "/d/c.crt",
        "DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT": "/d/c.crt",
        "DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY": "/d/c.pem",
    }


def test_the_gateways_bin_goes_last_on_path_once() -> None:
    ours = os.path.dirname(os.path.abspath(sys.executable))
    assert with_gateway_bin("/usr/bin:/bin") == f"/usr/bin:/bin:{ours}"
    assert with_gateway_bin(f"{ours}:/usr/bin") == f"{ours}:/usr/bin"
    assert with_gateway_bin(None) == f"{os.defpath}:{ours}"
    assert kit.inherited_env(["A", "B"], {"A": "1", "C": "3"}) == {"A": "1"}


async def test_attempts_sleep_the_backoff_between_tries_and_stop_on_break(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway_core.backends.kit import attempts, retries

    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(retries.asyncio, "sleep", fake_sleep)
    seen = [a async for a in attempts(5, base=0.5, max_delay=1.5)]
    assert seen == [0, 1, 2, 3, 4]
    assert slept == [0.5, 1.0, 1.5, 1.5]  # none before the first, capped at max_delay
    slept.clear()
    async for attempt in attempts(5, base=0.5, max_delay=1.5):
        if attempt == 1:
            break
    assert slept == [0.5]  # a success ends the loop: no sleep after it
    slept.clear()
    assert [a async for a in attempts(0, base=1, max_delay=1)] == [0]  # always one try
    assert slept == []
