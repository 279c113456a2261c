"""Tests of the PBS simulator itself: OpenPBS's output formats, messages and exit statuses,
jobs run as the submitting user, stage-in, output files, holds, qdel, concurrent qsubs.

Integration tests: real processes; the accounts they submit as need root.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pbs_sim.install import SimulatedPBS

pytestmark = pytest.mark.integration


def run(
    sim: SimulatedPBS,
    command: str,
    *args: str,
    user: pwd.struct_passwd | None = None,
    stdin: str | None = None,
    cwd: str = "/",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    return subprocess.run(
        [sim.program(command), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=30,
        **ids,
    )


def state_of(sim: SimulatedPBS, job_id: str) -> str:
    out = run(sim, "qstat", "-x", "-f", "-F", "json", job_id)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["Jobs"][job_id]["job_state"]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_job_runs_as_its_user_with_pbs_environment_and_output_copied_back(
    pbs: SimulatedPBS, make_user: Callable[[], pwd.struct_passwd]
) -> None:
    user = make_user()
    out_file = Path(user.pw_dir) / "job.log"
    script = 'id -u; echo "$PBS_JOBID $PBS_JOBNAME $FOO ${SECRET:-unset} $PWD"; echo oops >&2\n'
    sub = run(
        pbs,
        "qsub",
        "-N",
        "hello",
        "-v",
        "FOO=bar",
        "-l",
        "select=1:ncpus=2:mem=1gb",
        "-j",
        "oe",
        "-o",
        f"localhost:{out_file}",
        user=user,
        stdin=script,
        cwd=user.pw_dir,
        env={"SECRET": "qsubs own environment is not the job's"},
    )
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert re.fullmatch(rf"\d+\.{pbs.name}", job_id)
    wait_for(lambda: state_of(pbs, job_id) == "F", "the job to finish")
    assert out_file.read_text().splitlines() == [
        str(user.pw_uid),
        f"{job_id} hello bar unset {user.pw_dir}",
        "oops",
    ]
    assert out_file.stat().st_uid == user.pw_uid
    info = json.loads(run(pbs, "qstat", "-x", "-f", "-F", "json", job_id).stdout)["Jobs"][job_id]
    assert info["Exit_status"] == 0
    assert info["Job_Owner"].startswith(f"{user.pw_name}@")
    assert info["Resource_List"] == {
        "select": "1:ncpus=2:mem=1gb",
        "ncpus": "2",
        "mem": "1gb",
        "nodect": 1,
    }
    assert info["Variable_List"]["FOO"] == "bar"
    assert info["Variable_List"]["PBS_O_WORKDIR"] == user.pw_dir


def test_stagein_copies_files_into_a_private_sandbox_removed_afterwards(
    pbs: SimulatedPBS, make_user: Callable[[], pwd.struct_passwd]
) -> None:
    user = make_user()
    staging = Path(user.pw_dir) / "staging"
    subprocess.run(["install", "-d", "-m", "700", "-o", user.pw_name, str(staging)], check=True)
    (staging / "dask.crt").write_text("certificate\n")
    subprocess.run(["chown", "-R", user.pw_name, str(staging)], check=True)
    sub = run(
        pbs,
        "qsub",
        "-W",
        "sandbox=PRIVATE",
        f"-Wstagein=.@localhost:{staging}/*",
        "-j",
        "oe",
        "-o",
        f"{staging}/out.log",
        user=user,
        stdin='cat dask.crt; basename "$PWD"; exit 3\n',
    )
    job_id = sub.stdout.strip()
    wait_for(lambda: state_of(pbs, job_id) == "F", "the job to finish")
    assert (staging / "out.log").read_text() == f"certificate\npbs.{job_id}.x8z\n"
    assert not (Path(user.pw_dir) / f"pbs.{job_id}.x8z").exists()
    info = json.loads(run(pbs, "qstat", "-x", "-f", "-F", "json", job_id).stdout)["Jobs"][job_id]
    assert info["Exit_status"] == 3


def test_qstat_tables_and_errors_are_openpbs_s(
    pbs: SimulatedPBS, make_user: Callable[[], pwd.struct_passwd]
) -> None:
    user = make_user()
    running = run(pbs, "qsub", "-N", "a-rather-long-job-name", user=user, stdin="sleep 60\n")
    done = run(pbs, "qsub", "-q", "debug", user=user, stdin="true\n")
    rid, did = running.stdout.strip(), done.stdout.strip()
    wait_for(lambda: state_of(pbs, did) == "F" and state_of(pbs, rid) == "R", "R and F")

    table = run(pbs, "qstat", "-x", rid, did, f"999.{pbs.name}")
    assert table.returncode == 153
    assert table.stderr == f"qstat: Unknown Job Id 999.{pbs.name}\n"
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["Job", "id", "Name", "User", "Time", "Use", "S", "Queue"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1], r[2], r[4], r[5]) for r in rows] == [
        (rid, "a-rather-long-j*", user.pw_name, "R", "workq"),
        (did, "STDIN", user.pw_name, "F", "debug"),
    ]
    assert re.fullmatch(r"\d\d:\d\d:\d\d", rows[0][3])

    current = run(pbs, "qstat", did)
    assert current.returncode == 35
    assert current.stderr == (
        f"qstat: {did} Job has finished, use -x or -H to obtain historical job information\n"
    )
    assert run(pbs, "qstat", "-x", rid.split(".")[0]).returncode == 0  # "17" names 17.<server>

    bad = run(pbs, "qsub", "-q", "nosuchqueue", user=user, stdin="true\n")
    assert (bad.returncode, bad.stdout, bad.stderr) == (170, "", "qsub: Unknown queue\n")


def test_qselect_lists_the_ids_of_jobs_by_name_user_and_state(
    pbs: SimulatedPBS, make_user: Callable[[], pwd.struct_passwd]
) -> None:
    alice, bob = make_user(), make_user()
    name = f"dask-worker-{alice.pw_name}-w1"  # longer than qstat's 16-character column
    first = run(pbs, "qsub", "-N", name, user=alice, stdin="sleep 60\n").stdout.strip()
    held = run(pbs, "qsub", "-h", "-N", name, user=alice, stdin="sleep 60\n").stdout.strip()
    done = run(pbs, "qsub", "-N", name, user=alice, stdin="true\n").stdout.strip()
    run(pbs, "qsub", "-N", name, user=bob, stdin="sleep 60\n")
    run(pbs, "qsub", "-N", "other", user=alice, stdin="sleep 60\n")
    wait_for(lambda: state_of(pbs, done) == "F" and state_of(pbs, first) == "R", "R and F")

    def select(*args: str) -> list[str]:
        out = run(pbs, "qselect", *args, user=alice)
        assert (out.returncode, out.stderr) == (0, ""), out
        return out.stdout.splitlines()

    # The user's live jobs with that whole name, in submission order; the finished one only
    # with -x; none is an empty answer, not an error.
    assert select("-N", name, "-u", alice.pw_name) == [first, held]
    assert select("-N", name, "-u", alice.pw_name, "-x") == [first, held, done]
    assert select("-N", name, "-u", alice.pw_name, "-s", "QHWTSURB") == [first, held]
    assert select("-N", name, "-u", alice.pw_name, "-s", "R") == [first]
    assert select("-N", name[:16], "-u", alice.pw_name) == []
    bad = run(pbs, "qselect", "-s", "RZ", user=alice)
    assert (bad.returncode, bad.stdout, bad.stderr) == (2, "", "qselect: illegal -s value\n")
    for job_id in select("-u", f"{alice.pw_name},{bob.pw_name}"):
        run(pbs, "qdel", job_id)


def test_qdel_kills_the_job_process_group_and_refuses_finished_and_foreign_jobs(
    pbs: SimulatedPBS, make_user: Callable[[], pwd.struct_passwd]
) -> None:
    alice, bob = make_user(), make_user()
    marker = Path(alice.pw_dir) / "child.pid"
    sub = run(pbs, "qsub", user=alice, stdin=f"sleep 300 & echo $! > {marker}; wait\n")
    job_id = sub.stdout.strip()
    wait_for(marker.exists, "the job's child")
    wait_for(lambda: marker.read_text().strip() != "", "the child's pid")
    child = int(marker.read_text())

    foreign = run(pbs, "qdel", job_id, user=bob)
    assert (foreign.returncode, foreign.stderr) == (159, f"qdel: Unauthorized Request  {job_id}\n")
    assert run(pbs, "qdel", job_id, user=alice).returncode == 0
    assert state_of(pbs, job_id) == "F"
    wait_for(lambda: not Path(f"/proc/{child}").exists(), "the job's child killed")
    info = json.loads(run(pbs, "qstat", "-x", "-f", "-F", "json", job_id).stdout)["Jobs"][job_id]
    assert info["Exit_status"] == 271
    again = run(pbs, "qdel", job_id, user=alice)
    assert (again.returncode, again.stderr) == (35, f"qdel: Job has finished {job_id}\n")
    gone = run(pbs, "qdel", f"4242.{pbs.name}", user=alice)
    assert (gone.returncode, gone.stderr) == (153, f"qdel: Unknown Job Id 4242.{pbs.name}\n")


def test_held_jobs_wait_in_H_until_released_and_a_dead_runner_means_finished(
    pbs: SimulatedPBS, make_user: Callable[[], pwd.struct_passwd]
) -> None:
    user = make_user()
    held = run(pbs, "qsub", "-h", user=user, stdin="sleep 60\n").stdout.strip()
    time.sleep(0.5)
    assert state_of(pbs, held) == "H"
    assert run(pbs, "qrls", held, user=user).returncode == 0
    wait_for(lambda: state_of(pbs, held) == "R", "the released job running")
    record = json.loads((pbs.state / "jobs" / f"{held}.json").read_text())
    subprocess.run(["kill", "-KILL", str(record["runner_pid"])], check=True)
    wait_for(lambda: state_of(pbs, held) == "F", "the lost job finished")
    run(pbs, "qdel", held, user=user)
    _kill_group_of(user, record.get("pgid"))


def _kill_group_of(user: pwd.struct_passwd, pgid: object) -> None:
    """Clean up the job's own process group, and only that: a group whose leader is not the
    job user's (a number since reused, or this test's own group) is left alone."""
    if not isinstance(pgid, int) or pgid <= 1 or pgid == os.getpgid(0):
        return
    try:
        uid_line = next(
            line
            for line in Path(f"/proc/{pgid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
    except (OSError, StopIteration):
        return
    if int(uid_line.split()[1]) == user.pw_uid:
        os.killpg(pgid, signal.SIGKILL)


def test_concurrent_qsubs_get_distinct_sequence_numbers(
    pbs: SimulatedPBS, make_user: Callable[[], pwd.struct_passwd]
) -> None:
    user = make_user()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: run(pbs, "qsub", user=user, stdin="true\n"), range(32)))
    assert all(r.returncode == 0 for r in results)
    ids = [r.stdout.strip() for r in results]
    assert len(set(ids)) == 32
    wait_for(lambda: all(state_of(pbs, i) == "F" for i in ids), "every job finished")
