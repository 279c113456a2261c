"""Unit tests of site_policy.py: the form, the options → Slurm cluster config rules, the job
script the Slurm driver renders from the result, and the example gateway.toml. No processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import site_policy

from gateway_core.config import load_config, structure, unstructure
from gateway_core.configcheck import resolve_config
from gateway_core.context import GatewayContext
from gateway_core.models import Cluster, User, Worker
from gateway_core.options import OptionsError
from gateway_core.plugins import Registry, make_plugin_manager
from gateway_slurm.backend import SlurmClusterConfig, SlurmConfig, SlurmDriver

pytestmark = pytest.mark.unit

HERE = Path(__file__).resolve().parent.parent
ALICE = User(name="alice")
SITE_CLUSTER: dict[str, Any] = {
    "partition": "dask",
    "worker_setup": "module load gcc",
    "environment": {"SITE_VAR": "site", "MY_VAR": "from-site"},
}


def resolve(**user_options: Any) -> SlurmClusterConfig:
    """What the gateway does with a user's options: validate them against the form, ask the
    plugin for overrides, merge them over ``[cluster]`` and structure the result."""
    normalized = site_policy.site_options().validate(user_options)
    defaults = structure(SITE_CLUSTER, SlurmClusterConfig)
    overrides = site_policy.gateway_apply_options(user=ALICE, options=normalized, config=defaults)
    return structure({**SITE_CLUSTER, **overrides}, SlurmClusterConfig)


def refusal(**user_options: Any) -> str:
    normalized = site_policy.site_options().validate(user_options)
    with pytest.raises(OptionsError) as info:
        site_policy.gateway_apply_options(
            user=ALICE, options=normalized, config=structure(SITE_CLUSTER, SlurmClusterConfig)
        )
    return str(info.value)


def worker_script(settings: SlurmClusterConfig) -> str:
    context = GatewayContext(config=load_config({}, environ={}), hook=None)
    context.api_url = "http://gateway.example.org:8000/api"
    driver = SlurmDriver(
        config=SlurmConfig(submit_command="/usr/bin/sbatch", inherited_environment=[]),
        context=context,
        cluster_config_class=SlurmClusterConfig,
    )
    cluster = Cluster(
        name="abc123",
        username="alice",
        token="tok",
        config=unstructure(settings),
        tls_cert=b"C",
        tls_key=b"K",
        scheduler_address="tls://10.1.1.1:4000",
    )
    worker = Worker(name="abc123-w1", cluster_name="abc123")
    script: str = driver.job_script(cluster, settings, worker=worker, staging_dir="/h/.dg/abc123")
    return script


# --------------------------------------------------------------------------------------------
# The form
# --------------------------------------------------------------------------------------------


def test_the_form_lists_the_options_users_type_with_their_bounds() -> None:
    spec = {f["field"]: f for f in site_policy.site_options().spec_json()}
    assert list(spec) == [
        "worker_cores",
        "worker_memory",
        "env",
        "conda_env",
        "pixi_project",
        "pixi_env",
    ]
    assert spec["worker_cores"]["spec"] == {"type": "int", "min": 1, "max": 8}
    assert spec["worker_memory"]["spec"] == {"type": "float", "min": 1.0, "max": 32.0}
    assert spec["env"]["spec"] == {"type": "mapping"}
    assert spec["conda_env"]["default"] == ""


def test_out_of_bounds_sizes_are_refused_by_the_form() -> None:
    with pytest.raises(OptionsError) as info:
        site_policy.site_options().validate({"worker_cores": 9, "worker_memory": 0.5})
    assert info.value.problems == [
        "worker_cores: 9 is above the maximum of 8",
        "worker_memory: 0.5 is below the minimum of 1.0",
    ]


# --------------------------------------------------------------------------------------------
# Options → cluster config
# --------------------------------------------------------------------------------------------


def test_sizes_env_and_conda_become_the_cluster_config() -> None:
    settings = resolve(worker_cores=2, worker_memory=4, env={"MY_VAR": "1"}, conda_env="analysis")
    assert settings.worker_cores == 2
    assert settings.worker_memory == 4 * 2**30
    assert settings.environment == {"SITE_VAR": "site", "MY_VAR": "1"}
    assert settings.partition == "dask"
    assert settings.worker_setup.startswith("module load gcc\n")
    assert "conda activate analysis ||" in settings.worker_setup
    assert "conda activate analysis ||" in settings.scheduler_setup
    assert f'_site_conda_sh="{site_policy.CONDA_PROFILE}"' in settings.worker_setup


def test_fractional_gigabytes_become_whole_bytes() -> None:
    assert resolve(worker_memory=1.5).worker_memory == 1536 * 2**20


def test_no_environment_leaves_the_site_setup_alone() -> None:
    settings = resolve()
    assert settings.worker_setup == "module load gcc"
    assert settings.scheduler_setup == ""
    assert settings.environment == SITE_CLUSTER["environment"]


def test_a_pixi_project_and_environment_become_a_shell_hook() -> None:
    settings = resolve(pixi_project="/depot/alice/ana", pixi_env="gpu")
    assert settings.worker_setup == (
        "module load gcc\n"
        '_site_pixi_hook="$(pixi shell-hook --shell bash --manifest-path /depot/alice/ana '
        '-e gpu)" || { echo "site_policy: pixi shell-hook failed for "/depot/alice/ana >&2; '
        "exit 1; }\n"
        'eval "$_site_pixi_hook"\n'
    )


def test_a_pixi_project_without_environment_uses_pixis_default() -> None:
    setup = resolve(pixi_project="/depot/alice/ana").scheduler_setup
    assert "--manifest-path /depot/alice/ana)" in setup
    assert " -e " not in setup


def test_conda_and_pixi_together_are_refused_naming_both() -> None:
    message = refusal(conda_env="analysis", pixi_project="/depot/alice/ana")
    assert "conda_env and pixi_project are mutually exclusive" in message
    assert "'analysis'" in message and "'/depot/alice/ana'" in message


def test_a_pixi_environment_needs_its_project() -> None:
    assert "pixi_env needs pixi_project" in refusal(pixi_env="gpu")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("conda_env", "analysis; rm -rf ~"),
        ("conda_env", "$(id)"),
        ("conda_env", "my env"),
        ("conda_env", "--help"),
        ("pixi_project", "~/ana"),
        ("pixi_project", "/depot/`id`"),
    ],
)
def test_names_with_shell_characters_are_refused(field: str, value: str) -> None:
    message = refusal(**{field: value})
    assert message.startswith(f"{field}: {value!r} is not allowed")


def test_a_pixi_environment_name_with_shell_characters_is_refused() -> None:
    message = refusal(pixi_project="/depot/ana", pixi_env="a&b")
    assert message == "pixi_env: 'a&b' is not allowed: use letters, digits, - and _ only"


def test_env_from_os_environ_drops_what_sh_cannot_export_and_the_gateways_own() -> None:
    settings = resolve(
        env={
            "X509_USER_PROXY": "/depot/alice/x509",
            "BASH_FUNC_module%%": "() { eval $($LMOD_CMD bash $*); }",
            "DASK_GATEWAY_API_TOKEN": "stolen",
        }
    )
    assert settings.environment == {
        "SITE_VAR": "site",
        "MY_VAR": "from-site",
        "X509_USER_PROXY": "/depot/alice/x509",
    }


def test_env_values_must_be_strings() -> None:
    assert refusal(env={"A": 1, "B": "ok", "C": None}) == (
        "env: values must be strings; 'A', 'C' are not"
    )


def test_a_backend_without_setup_scripts_cannot_activate_an_environment() -> None:
    from gateway_core.config import ClusterConfig

    normalized = site_policy.site_options().validate({"conda_env": "analysis"})
    with pytest.raises(OptionsError, match="runs no setup scripts"):
        site_policy.gateway_apply_options(user=ALICE, options=normalized, config=ClusterConfig())


# --------------------------------------------------------------------------------------------
# The job script the Slurm driver renders
# --------------------------------------------------------------------------------------------


def test_the_job_script_exports_env_then_activates_conda_then_starts_the_worker() -> None:
    script = worker_script(
        resolve(worker_cores=2, worker_memory=4, env={"MY_VAR": "1 2"}, conda_env="analysis")
    )
    lines = script.splitlines()
    assert "export MY_VAR='1 2'" in lines
    assert "export SITE_VAR=site" in lines
    activate = next(i for i, line in enumerate(lines) if line.startswith("conda activate"))
    assert lines[activate] == (
        "conda activate analysis || "
        '{ echo "site_policy: cannot activate conda environment "analysis >&2; exit 1; }'
    )
    assert lines.index("export MY_VAR='1 2'") < lines.index("module load gcc") < activate
    assert lines[-1].startswith("exec dask worker tls://10.1.1.1:4000 ")
    assert "--nthreads 2 --memory-limit 4294967296" in lines[-1]


def test_the_job_script_of_a_pixi_cluster_evaluates_the_shell_hook() -> None:
    script = worker_script(resolve(pixi_project="/depot/alice/ana", pixi_env="gpu"))
    assert (
        '_site_pixi_hook="$(pixi shell-hook --shell bash --manifest-path /depot/alice/ana -e gpu)"'
        in script
    )
    assert '\neval "$_site_pixi_hook"\n' in script
    assert "conda activate" not in script


# --------------------------------------------------------------------------------------------
# The example gateway.toml
# --------------------------------------------------------------------------------------------


def test_the_example_gateway_toml_loads_with_its_local_plugin_and_the_slurm_backend() -> None:
    config = load_config(path=HERE / "gateway.toml", environ={})
    assert config.plugins == ["site_policy"]
    pm = make_plugin_manager(local_plugins=config.plugins, local_plugin_path=[HERE])
    assert pm.get_plugin("site_policy") is site_policy
    resolved = resolve_config(config, Registry.from_plugin_manager(pm))
    assert resolved.backend_spec.name == "slurm"
    assert isinstance(resolved.cluster, SlurmClusterConfig)
    assert resolved.cluster.partition == "dask"
    form = pm.hook.gateway_cluster_options(user=ALICE, config=config)
    assert form.names == site_policy.site_options().names
