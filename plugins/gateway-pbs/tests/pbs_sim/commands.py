"""The simulated commands: ``qsub``, ``qstat``, ``qselect``, ``qdel``, ``qrls`` and the runner
qsub forks for each job, with OpenPBS's output formats, messages and exit statuses.

Owns each command's ``main(server_root, argv)``. A job is run by a detached runner process of
the submitting user: it stages files in, starts the job script in its own process group
(state ``R``), waits, copies the output to its destination (state ``E``), and records the exit
status (state ``F``). ``qdel`` kills the job's process group.
"""

from __future__ import annotations

import contextlib
import getopt
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from .server import (
    EXIT_BAD_ATTRIBUTE,
    EXIT_JOB_FINISHED,
    EXIT_PERMISSION,
    EXIT_UNKNOWN_JOB,
    EXIT_UNKNOWN_QUEUE,
    Server,
    process_start,
)

LIB = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_DELAY = 2.0
"""Seconds between qdel's SIGTERM and SIGKILL (PBS's ``kill_delay``, 10 s by default)."""


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _user() -> pwd.struct_passwd:
    return pwd.getpwuid(os.getuid())


def _parse_resources(values: list[str]) -> dict[str, Any]:
    """``-l`` values as PBS's Resource_List: ``select=1:ncpus=2:mem=2gb`` also sets ``ncpus``,
    ``mem`` and ``nodect`` (bookkeeping only; nothing is enforced)."""
    resources: dict[str, Any] = {}
    for value in values:
        for item in value.split(","):
            if "=" not in item:
                raise ValueError(f"illegal -l value {item!r}")
            key, val = item.split("=", 1)
            resources[key] = val
            if key == "select":
                chunks, *parts = val.split(":")
                if not chunks.isdigit():
                    parts, chunks = [chunks, *parts], "1"
                for part in parts:
                    if "=" not in part:
                        raise ValueError(f"illegal select chunk {val!r}")
                    k, v = part.split("=", 1)
                    resources[k] = v
                resources["nodect"] = int(chunks)
    return resources


def _parse_variables(value: str) -> dict[str, str]:
    """``-v a,b=1``: ``a`` from qsub's environment, ``b`` set to 1."""
    out: dict[str, str] = {}
    for item in value.split(","):
        if not item:
            continue
        if "=" in item:
            k, v = item.split("=", 1)
            out[k] = v
        elif item in os.environ:
            out[item] = os.environ[item]
    return out


def _strip_host(path: str) -> str:
    return path.split(":", 1)[1] if ":" in path else path


def qsub(root: str, argv: list[str]) -> int:
    server = Server(root)
    try:
        opts, args = getopt.getopt(argv, "A:N:P:q:l:v:W:o:e:j:Vh")
    except getopt.GetoptError as exc:
        _err(f"qsub: {exc}")
        _err("usage: qsub [-A account_string] [-e path] [-h] [-j oe|eo] [-l resource_list] ...")
        return EXIT_BAD_ATTRIBUTE
    user = _user()
    cwd = os.getcwd()
    job: dict[str, Any] = {
        "queue": server.settings["default_queue"],
        "name": "",
        "account": "",
        "project": "",
        "join": "n",
        "output": "",
        "error": "",
        "stagein": [],
        "sandbox": "HOME",
        "hold": False,
    }
    resources: list[str] = []
    variables: dict[str, str] = {}
    for opt, val in opts:
        if opt == "-A":
            job["account"] = val
        elif opt == "-N":
            job["name"] = val
        elif opt == "-P":
            job["project"] = val
        elif opt == "-q":
            job["queue"] = val.split("@", 1)[0]
        elif opt == "-l":
            resources.append(val)
        elif opt == "-v":
            variables.update(_parse_variables(val))
        elif opt == "-V":
            variables.update(os.environ)
        elif opt == "-o":
            job["output"] = val
        elif opt == "-e":
            job["error"] = val
        elif opt == "-j":
            job["join"] = val
        elif opt == "-h":
            job["hold"] = True
        elif opt == "-W":
            key, _, value = val.partition("=")
            if key == "stagein":
                job["stagein"] = value.split(",")
            elif key == "sandbox":
                job["sandbox"] = value.upper()
            else:
                job[f"W_{key}"] = value
    if job["queue"] not in server.settings["queues"]:
        _err("qsub: Unknown queue")
        return EXIT_UNKNOWN_QUEUE
    try:
        job["resources"] = _parse_resources(resources)
    except ValueError as exc:
        _err(f"qsub: {exc}")
        return EXIT_BAD_ATTRIBUTE
    for spec in job["stagein"]:
        if "@" not in spec or ":" not in spec.split("@", 1)[1]:
            _err(f"qsub: illegal -W value: stagein={spec}")
            return EXIT_BAD_ATTRIBUTE
    if args:
        try:
            with open(args[0]) as f:
                script = f.read()
        except OSError as exc:
            _err(f"qsub: script file:: {exc.strerror}")
            return EXIT_BAD_ATTRIBUTE
        job["name"] = job["name"] or os.path.basename(args[0])
    else:
        script = sys.stdin.read()
        job["name"] = job["name"] or "STDIN"
    if not script.strip():
        _err("qsub: script file is empty")
        return EXIT_BAD_ATTRIBUTE
    job["variables"] = {
        **variables,
        "PBS_O_HOME": user.pw_dir,
        "PBS_O_LOGNAME": user.pw_name,
        "PBS_O_PATH": os.environ.get("PATH", ""),
        "PBS_O_SHELL": user.pw_shell,
        "PBS_O_WORKDIR": cwd,
        "PBS_O_HOST": server.settings["hosts"][-1],
        "PBS_O_QUEUE": job["queue"],
    }
    with server.locked():
        seq = server.next_sequence()
        job_id = f"{seq}.{server.name}"
        default_dest = os.path.join(cwd, f"{job['name']}.{{}}{seq}")
        job.update(
            id=job_id,
            seq=seq,
            owner=user.pw_name,
            uid=user.pw_uid,
            state="H" if job["hold"] else "Q",
            output=_strip_host(job["output"]) or default_dest.format("o"),
            error=_strip_host(job["error"]) or default_dest.format("e"),
            ctime=time.time(),
            exit_status=None,
        )
        with open(server.script_path(job_id), "w") as f:
            f.write(script)
        server.save(job)
    if not job["hold"]:
        _start_runner(root, job_id)
    print(job_id)
    return 0


def _start_runner(root: str, job_id: str) -> None:
    code = (
        f"import sys; sys.path.insert(0, {LIB!r}); from pbs_sim.commands import run_job; "
        f"sys.exit(run_job({root!r}, {job_id!r}))"
    )
    subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd="/",
    )


def _job_env(server: Server, job: dict[str, Any], workdir: str) -> dict[str, str]:
    """What a PBS job's environment is: not qsub's, but the login basics, ``-v``/``-V``
    variables, the ``PBS_O_*`` of the submission and the job's own ``PBS_*``."""
    user = _user()
    env = {
        "HOME": user.pw_dir,
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "SHELL": user.pw_shell or "/bin/sh",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
    }
    env.update(job["variables"])
    env.update(
        PBS_JOBID=job["id"],
        PBS_JOBNAME=job["name"],
        PBS_QUEUE=job["queue"],
        PBS_ENVIRONMENT="PBS_BATCH",
        PBS_JOBDIR=workdir,
        TMPDIR=f"/tmp/pbs.{job['id']}",
    )
    return env


def _stage_in(server: Server, job: dict[str, Any], workdir: str) -> None:
    for spec in job["stagein"]:
        local, remote = spec.split("@", 1)
        host, path = remote.split(":", 1)
        if host not in server.settings["hosts"]:
            raise OSError(f"cannot reach {host} to stage in {path}")
        sources = glob.glob(path)
        if not sources:
            raise OSError(f"stage in: no such file {path}")
        dest = os.path.join(workdir, local)
        for src in sources:
            target = os.path.join(dest, os.path.basename(src)) if os.path.isdir(dest) else dest
            if os.path.isdir(src):
                shutil.copytree(src, target)
            else:
                shutil.copy2(src, target)


def run_job(root: str, job_id: str) -> int:
    """The runner of one job (qsub forks it, detached, as the submitting user)."""
    server = Server(root)
    time.sleep(float(server.settings.get("start_delay") or 0))
    me = os.getpid()
    with server.locked():
        job = server.load(job_id)
        if job is None or job["state"] != "Q":
            return 0  # deleted while queued
        job.update(state="R", runner_pid=me, runner_start=process_start(me), stime=time.time())
        server.save(job)
    home = _user().pw_dir
    workdir = home
    if job["sandbox"] == "PRIVATE":
        workdir = os.path.join(home, f"pbs.{job_id}.x8z")
        os.makedirs(workdir, mode=0o700, exist_ok=True)
    spool_out = os.path.join(server.spool_dir, f"{job_id}.OU")
    spool_err = os.path.join(server.spool_dir, f"{job_id}.ER")
    try:
        _stage_in(server, job, workdir)
    except OSError as exc:
        with open(spool_out, "w") as f:
            f.write(f"PBS: stage in failed: {exc}\n")
        _finish(server, job, workdir, spool_out, None, exit_status=-4)
        return 0
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(spool_out, "wb"))
        joined = job["join"] in ("oe", "eo")
        err = out if joined else files.enter_context(open(spool_err, "wb"))
        proc = subprocess.Popen(
            ["/bin/sh", server.script_path(job_id)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=workdir,
            env=_job_env(server, job, workdir),
            start_new_session=True,
        )
    with server.locked():
        current = server.load(job_id)
        assert current is not None
        killed = current["state"] == "F"
        current.update(pgid=proc.pid, session_id=proc.pid)
        server.save(current)
    if killed:  # qdel came between R and the start of the script
        os.killpg(proc.pid, signal.SIGKILL)
    returncode = proc.wait()
    exit_status = returncode if returncode >= 0 else 256 - returncode
    with server.locked():
        current = server.load(job_id)
        if current is not None and current["state"] == "R":
            current["state"] = "E"  # copying the output back
            server.save(current)
    _finish(server, job, workdir, spool_out, None if joined else spool_err, exit_status)
    return 0


def _finish(
    server: Server,
    job: dict[str, Any],
    workdir: str,
    spool_out: str,
    spool_err: str | None,
    exit_status: int,
) -> None:
    """Copy the output to its destinations, clean the sandbox, record the end."""
    for spool, dest in ((spool_out, job["output"]), (spool_err, job["error"])):
        if spool is None or not os.path.exists(spool):
            continue
        try:
            shutil.copyfile(spool, dest)
        except OSError:
            pass  # PBS would keep it in undelivered/; the simulator drops it
        os.unlink(spool)
    if job["sandbox"] == "PRIVATE":
        shutil.rmtree(workdir, ignore_errors=True)
    with server.locked():
        current = server.load(job["id"])
        assert current is not None
        if current.get("exit_status") is None:
            current["exit_status"] = exit_status
        current.update(state="F", mtime=time.time(), runner_pid=None)
        server.save(current)


def _format_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _row(job: dict[str, Any]) -> str:
    def cut(text: str, width: int) -> str:
        return text if len(text) <= width else text[: width - 1] + "*"

    used = 0.0
    if job.get("stime"):
        used = (job.get("mtime") or time.time()) - job["stime"]
    return (
        f"{cut(job['id'], 16):<16}  {cut(job['name'], 16):<16} {cut(job['owner'], 16):<16}  "
        f"{_format_time(used):>8} {job['state']} {cut(job['queue'], 5)}"
    )


def _json_job(server: Server, job: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "Job_Name": job["name"],
        "Job_Owner": f"{job['owner']}@{server.settings['hosts'][-1]}",
        "job_state": job["state"],
        "queue": job["queue"],
        "server": server.name,
        "ctime": time.ctime(job["ctime"]),
        "Join_Path": job["join"],
        "Output_Path": f"{server.settings['hosts'][-1]}:{job['output']}",
        "Error_Path": f"{server.settings['hosts'][-1]}:{job['error']}",
        "Resource_List": job["resources"],
        "Variable_List": job["variables"],
        "sandbox": job["sandbox"],
    }
    if job["account"]:
        out["Account_Name"] = job["account"]
    if job["project"]:
        out["project"] = job["project"]
    if job["stagein"]:
        out["stagein"] = ",".join(job["stagein"])
    if job.get("session_id"):
        out["session_id"] = job["session_id"]
    if job["state"] == "F" and job.get("exit_status") is not None:
        out["Exit_status"] = job["exit_status"]
    if job.get("comment"):
        out["comment"] = job["comment"]
    return out


def qstat(root: str, argv: list[str]) -> int:
    server = Server(root)
    try:
        opts, ids = getopt.getopt(argv, "xfF:")
    except getopt.GetoptError as exc:
        _err(f"qstat: {exc}")
        return EXIT_BAD_ATTRIBUTE
    flags = dict(opts)
    history = "-x" in flags
    as_json = flags.get("-F") == "json"
    if "-F" in flags and (not as_json or "-f" not in flags):
        _err("qstat: -F is only valid with -f, and this simulator knows only -F json")
        return EXIT_BAD_ATTRIBUTE
    status = 0
    jobs = []
    with server.locked():
        for job_id in ids or server.all_ids():
            job = server.load(job_id)
            if job is None:
                _err(f"qstat: Unknown Job Id {server.full_id(job_id)}")
                status = EXIT_UNKNOWN_JOB
            elif job["state"] == "F" and not history:
                if ids:
                    _err(
                        f"qstat: {job['id']} Job has finished, use -x or -H to obtain "
                        "historical job information"
                    )
                    status = EXIT_JOB_FINISHED
            else:
                jobs.append(job)
    if as_json:
        doc = {
            "timestamp": int(time.time()),
            "pbs_version": "23.06.06-sim",
            "pbs_server": server.name,
            "Jobs": {job["id"]: _json_job(server, job) for job in jobs},
        }
        print(json.dumps(doc, indent=4))
    elif "-f" in flags:
        for job in jobs:
            print(f"Job Id: {job['id']}")
            for key, value in _json_job(server, job).items():
                if isinstance(value, dict):
                    for k, v in value.items():
                        print(f"    {key}.{k} = {v}")
                else:
                    print(f"    {key} = {value}")
            print()
    elif jobs:
        print("Job id            Name             User              Time Use S Queue")
        print("----------------  ---------------- ----------------  -------- - -----")
        for job in jobs:
            print(_row(job))
    return status


QSELECT_STATES = "BEFHMQRSTUWX"
"""The letters ``qselect -s`` takes (OpenPBS); F, M and X (ended, moved, finished subjob) are
history, selected only with ``-x``."""


def qselect(root: str, argv: list[str]) -> int:
    """The ids of the jobs passing every filter given, one per line in the server's (submission)
    order; none is no error. Filters: ``-N name`` (the whole name), ``-u user[@host][,...]``,
    ``-s states``, ``-q queue``; ``-x`` adds finished jobs (history)."""
    server = Server(root)
    try:
        opts, args = getopt.getopt(argv, "N:u:s:q:xH")
    except getopt.GetoptError as exc:
        _err(f"qselect: {exc}")
        _err("usage: qselect [-N name] [-q destination] [-s states] [-u user_list] [-x] ...")
        return EXIT_BAD_ATTRIBUTE
    if args:
        _err("usage: qselect [-N name] [-q destination] [-s states] [-u user_list] [-x] ...")
        return EXIT_BAD_ATTRIBUTE
    flags = dict(opts)
    history = "-x" in flags or "-H" in flags
    states = flags.get("-s")
    if states is not None and (not states or set(states) - set(QSELECT_STATES)):
        _err("qselect: illegal -s value")
        return EXIT_BAD_ATTRIBUTE
    users = None
    if "-u" in flags:
        users = {u.split("@", 1)[0] for u in flags["-u"].split(",") if u}
    queue = flags.get("-q", "").split("@", 1)[0]
    with server.locked():
        for job_id in server.all_ids():
            job = server.load(job_id)
            if job is None or (job["state"] in ("F", "M", "X") and not history):
                continue
            if "-N" in flags and job["name"] != flags["-N"]:
                continue
            if users is not None and job["owner"] not in users:
                continue
            if states is not None and job["state"] not in states:
                continue
            if queue and job["queue"] != queue:
                continue
            print(job["id"])
    return 0


def _kill(job: dict[str, Any]) -> None:
    pgid = job.get("pgid")
    # Never signal our own group (or init's): only a job's own session is ever killed.
    if not isinstance(pgid, int) or pgid <= 1 or pgid == os.getpgid(0):
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_DELAY
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def qdel(root: str, argv: list[str]) -> int:
    server = Server(root)
    try:
        _, ids = getopt.getopt(argv, "Wx:")
    except getopt.GetoptError as exc:
        _err(f"qdel: {exc}")
        return EXIT_BAD_ATTRIBUTE
    if not ids:
        _err("usage: qdel [-W force|suppress_email=X] [-x] job_identifier...")
        return EXIT_BAD_ATTRIBUTE
    status = 0
    uid = os.getuid()
    for job_id in ids:
        with server.locked():
            job = server.load(job_id)
            if job is None:
                _err(f"qdel: Unknown Job Id {server.full_id(job_id)}")
                status = EXIT_UNKNOWN_JOB
                continue
            if uid not in (0, job["uid"]):
                _err(f"qdel: Unauthorized Request  {job['id']}")
                status = EXIT_PERMISSION
                continue
            if job["state"] == "F":
                _err(f"qdel: Job has finished {job['id']}")
                status = EXIT_JOB_FINISHED
                continue
            was = job["state"]
            job.update(state="F", mtime=time.time())
            job["exit_status"] = 271 if was in ("R", "E") else None
            server.save(job)
        if was in ("R", "E"):
            _kill(job)
    return status


def qrls(root: str, argv: list[str]) -> int:
    """Release held jobs (``qsub -h``): they are queued and start."""
    server = Server(root)
    status = 0
    for job_id in argv:
        with server.locked():
            job = server.load(job_id)
            if job is None:
                _err(f"qrls: Unknown Job Id {server.full_id(job_id)}")
                status = EXIT_UNKNOWN_JOB
                continue
            if job["state"] != "H":
                continue
            job["state"] = "Q"
            server.save(job)
        _start_runner(root, job["id"])
    return status


COMMANDS = {"qsub": qsub, "qstat": qstat, "qselect": qselect, "qdel": qdel, "qrls": qrls}
