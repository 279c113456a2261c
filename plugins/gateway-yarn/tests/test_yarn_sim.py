"""Integration tests of the YARN simulator (tests/yarn_sim) through the real ``skein`` client:
submission, the application master's containers, localized files and YARN's environment,
mutual TLS, and what YARN does on failures.

The simulator runs scripts as local processes; these tests prove it speaks skein's protocol the
way the gateway's driver relies on, so the driver's tests against it mean something.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import skein
from yarn_sim.server import YarnSimulator

pytestmark = pytest.mark.integration


def wait_for(predicate: Callable[[], object], *, timeout: float = 20.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def spec(
    tmp_path: Path, *, master: str, queue: str = "default", user: str = ""
) -> skein.ApplicationSpec:
    payload = tmp_path / "payload.txt"
    payload.write_text("localized\n")
    return skein.ApplicationSpec(
        name="dask-gateway",
        queue=queue,
        user=user,
        tags=["dask-gateway"],
        master=skein.Master(
            script=master,
            resources=skein.Resources(memory=256, vcores=1),
            files={"payload.txt": str(payload)},
            env={"FROM_SPEC": "master"},
        ),
        services={
            "dask.worker": skein.Service(
                script='echo "worker $WORKER_NAME $FROM_SPEC" > "$LOG_DIRS/out"; '
                'cat payload.txt >> "$LOG_DIRS/out"; sleep 600',
                instances=0,
                max_restarts=0,
                resources=skein.Resources(memory=128, vcores=1),
                files={"payload.txt": str(payload)},
                env={"FROM_SPEC": "service"},
            )
        },
    )


def running(client: skein.Client, app_id: str) -> skein.ApplicationClient:
    return client.connect(app_id)


def test_submit_runs_the_master_with_yarns_environment(
    yarn_sim: YarnSimulator, skein_client: skein.Client, tmp_path: Path
) -> None:
    app_id = skein_client.submit(
        spec(tmp_path, master='env > "$LOG_DIRS/env"; pwd >> "$LOG_DIRS/env"; sleep 600')
    )
    app = running(skein_client, app_id)
    report = skein_client.application_report(app_id)
    assert report.state == "RUNNING"
    assert (report.name, report.queue) == ("dask-gateway", "default")
    [master] = [c for _, c in yarn_sim.live_processes()]
    env_file = master.logdir / "env"
    wait_for(env_file.exists, what="the master's environment")
    wait_for(lambda: len(env_file.read_text().splitlines()) > 5, what="env written")
    lines = env_file.read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    workdir = lines[-1]
    assert env["CONTAINER_ID"] == master.yarn_id
    assert env["SKEIN_APPLICATION_ID"] == app_id
    assert env["FROM_SPEC"] == "master"
    assert workdir == os.path.join(env["LOCAL_DIRS"], env["CONTAINER_ID"])
    assert Path(workdir, "payload.txt").read_text() == "localized\n"
    assert Path(workdir, ".skein.crt").exists() and Path(workdir, ".skein.pem").exists()
    assert env["SKEIN_APPMASTER_ADDRESS"] == app.address
    app.close()


def test_containers_are_added_listed_and_killed_through_the_application_master(
    yarn_sim: YarnSimulator, skein_client: skein.Client, tmp_path: Path
) -> None:
    app_id = skein_client.submit(spec(tmp_path, master="sleep 600"))
    app = running(skein_client, app_id)
    first = app.add_container("dask.worker", env={"WORKER_NAME": "w1"})
    second = app.add_container("dask.worker", env={"WORKER_NAME": "w2"})
    assert (first.id, second.id) == ("dask.worker_0", "dask.worker_1")
    assert [c.id for c in app.get_containers(services=["dask.worker"])] == [first.id, second.id]
    out = yarn_sim.apps[app_id].containers[first.id].logdir / "out"
    wait_for(lambda: out.exists() and "localized" in out.read_text(), what="the worker's output")
    assert out.read_text() == "worker w1 service\nlocalized\n"

    app.kill_container(first.id)
    [killed] = app.get_containers(states=["KILLED"])
    assert killed.id == first.id
    assert [c.id for c in app.get_containers()] == [second.id]
    wait_for(lambda: yarn_sim.apps[app_id].containers[first.id].proc.poll() is not None)
    with pytest.raises(KeyError, match=r"dask\.worker_7"):
        app.kill_container("dask.worker_7")
    app.scale("dask.worker", count=3)
    assert len(app.get_containers(services=["dask.worker"])) == 3
    app.close()


def test_a_container_whose_process_dies_is_failed(
    yarn_sim: YarnSimulator, skein_client: skein.Client, tmp_path: Path
) -> None:
    app_id = skein_client.submit(spec(tmp_path, master="sleep 600"))
    app = running(skein_client, app_id)
    worker = app.add_container("dask.worker", env={"WORKER_NAME": "w"})
    yarn_sim.kill_container_process(app_id, worker.id)
    wait_for(lambda: not app.get_containers(), what="the container ended")
    [failed] = app.get_containers(states=["FAILED"])
    assert "Exit code: 137" in failed.exit_message
    app.close()


def test_an_unknown_queue_fails_the_application_with_yarns_diagnostics(
    skein_client: skein.Client, tmp_path: Path
) -> None:
    app_id = skein_client.submit(spec(tmp_path, master="sleep 600", queue="nope"))
    wait_for(lambda: skein_client.application_report(app_id).state == "FAILED")
    report = skein_client.application_report(app_id)
    assert f"submitted by user {report.user} to unknown queue: nope" in report.diagnostics
    with pytest.raises(skein.exceptions.ApplicationNotRunningError):
        skein_client.connect(app_id)


def test_an_unknown_user_fails_the_application(skein_client: skein.Client, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the simulator switches users only as root"
    app_id = skein_client.submit(spec(tmp_path, master="sleep 600", user="nosuchuser42"))
    wait_for(lambda: skein_client.application_report(app_id).state == "FAILED")
    assert "User nosuchuser42 not found" in skein_client.application_report(app_id).diagnostics


def test_a_master_script_failing_ends_the_application_and_its_log_is_aggregated(
    yarn_sim: YarnSimulator, skein_client: skein.Client, tmp_path: Path
) -> None:
    app_id = skein_client.submit(spec(tmp_path, master="echo going; echo broken >&2; exit 3"))
    wait_for(lambda: skein_client.application_report(app_id).state == "FINISHED")
    report = skein_client.application_report(app_id)
    assert report.final_status == "FAILED"
    assert "exited with exit code 3" in report.diagnostics
    logs = skein_client.application_logs(app_id)
    [text] = logs.values()
    assert "LogType:application.master.log" in text and "going\nbroken\n" in text


def test_logs_of_a_running_application_are_not_aggregated_yet(
    skein_client: skein.Client, tmp_path: Path
) -> None:
    app_id = skein_client.submit(spec(tmp_path, master="sleep 600"))
    running(skein_client, app_id).close()
    with pytest.raises(ValueError, match="Log aggregation has not completed"):
        skein_client.application_logs(app_id)


def test_kill_and_shutdown_end_applications_and_their_processes(
    yarn_sim: YarnSimulator, skein_client: skein.Client, tmp_path: Path
) -> None:
    killed = skein_client.submit(spec(tmp_path, master="sleep 600"))
    done = skein_client.submit(spec(tmp_path, master="sleep 600"))
    app = running(skein_client, killed)
    app.add_container("dask.worker", env={"WORKER_NAME": "w"})
    app.close()
    with running(skein_client, done) as other:
        other.shutdown("SUCCEEDED")
    skein_client.kill_application(killed)
    report = skein_client.application_report(killed)
    assert (report.state, report.final_status) == ("KILLED", "KILLED")
    assert f"Application {killed} was killed by user" in report.diagnostics
    assert skein_client.application_report(done).final_status == "SUCCEEDED"
    wait_for(lambda: not yarn_sim.live_processes(), what="every process gone")
    active = skein_client.get_applications()
    assert active == []
    listed = skein_client.get_applications(states=["KILLED", "FINISHED"], name="dask-gateway")
    assert sorted(r.id for r in listed) == sorted([killed, done])


def test_unknown_ids_and_a_wrong_certificate_are_refused(
    yarn_sim: YarnSimulator, skein_client: skein.Client
) -> None:
    with pytest.raises(KeyError, match="application_1_0042"):
        skein_client.application_report("application_1_0042")
    with pytest.raises(KeyError):
        skein_client.kill_application("application_1_0042")
    with pytest.raises(skein.exceptions.ConnectionError):
        skein.Client(address=yarn_sim.address, security=skein.Security.new_credentials())


def test_an_injected_failure_is_a_driver_error(
    yarn_sim: YarnSimulator, skein_client: skein.Client
) -> None:
    yarn_sim.failures["getApplications"] = 1
    with pytest.raises(skein.exceptions.DriverError, match="failure injected"):
        skein_client.get_applications()
    assert skein_client.get_applications() == []
    assert yarn_sim.calls["getApplications"] == 2
