"""Tests of worker groups in the config: declaring groups, what a group's workers get
(`ClusterConfig.for_group`), backend extras, limits, and the errors for bad declarations.

The REST side is in test_api.py, the reconciler side in test_reconciler.py.
"""

from __future__ import annotations

import pytest
from attrs import define, field

from gateway_core.config import ClusterConfig, ConfigError, load_config, structure
from gateway_core.models import group_of_worker, worker_name

pytestmark = pytest.mark.unit


@define(kw_only=True, frozen=True)
class PartitionedConfig(ClusterConfig):
    """A backend's cluster config with a setting of its own, as Slurm's has."""

    partition: str = ""
    node_labels: dict[str, str] = field(factory=dict)
    merged_keys = ClusterConfig.merged_keys | {"node_labels"}


def test_a_group_gets_its_own_settings_over_the_cluster_ones() -> None:
    config = structure(
        {
            "worker_cores": 2,
            "worker_memory": "4 GiB",
            "worker_threads": 2,
            "environment": {"A": "1", "B": "cluster"},
            "worker_groups": {
                "gpu": {"worker_cores": 8, "environment": {"B": "gpu"}, "max_workers": 3},
                "highmem": {"worker_memory": "64 GiB"},
            },
        },
        ClusterConfig,
    )
    gpu = config.for_group("gpu")
    assert (gpu.worker_cores, gpu.threads, gpu.worker_memory) == (8, 8, 4 << 30)
    assert gpu.environment == {"A": "1", "B": "gpu"}
    assert gpu.worker_groups == {}
    highmem = config.for_group("highmem")
    assert (highmem.worker_cores, highmem.threads, highmem.worker_memory) == (2, 2, 64 << 30)
    assert config.for_group("default") is config
    assert config.group_names() == ["default", "gpu", "highmem"]
    assert config.group_max_workers("gpu") == 3
    assert config.group_max_workers("highmem") is None


def test_backend_extras_reach_the_backends_own_settings() -> None:
    config = structure(
        {
            "partition": "cpu",
            "node_labels": {"zone": "a"},
            "cluster_max_workers": 10,
            "worker_groups": {
                "gpu": {"backend": {"partition": "gpu", "node_labels": {"accel": "a100"}}}
            },
        },
        PartitionedConfig,
    )
    gpu = config.for_group("gpu")
    assert isinstance(gpu, PartitionedConfig)
    assert gpu.partition == "gpu"
    assert gpu.node_labels == {"zone": "a", "accel": "a100"}  # a merged key merges
    assert config.partition == "cpu"
    assert config.group_max_workers("gpu") == 10  # cluster_max_workers when unset


def test_enabled_worker_groups_limit_what_a_cluster_may_scale() -> None:
    config = structure(
        {"worker_groups": {"gpu": {}, "big": {}}, "enabled_worker_groups": ["big"]},
        ClusterConfig,
    )
    assert config.group_names() == ["default", "big"]
    assert config.group_names(all_groups=True) == ["default", "gpu", "big"]
    with pytest.raises(KeyError, match="no worker group 'gpu'; the groups are default, big"):
        config.group("gpu")


@pytest.mark.parametrize(
    ("groups", "problem"),
    [
        ({"GPU": {}}, "worker_groups.GPU: invalid group name 'GPU'"),
        ({"a" * 17: {}}, f"worker_groups.{'a' * 17}: invalid group name"),
        ({"default": {}}, "worker_groups.default: 'default' is the name of the default group"),
        ({"gpu": {"worker_cores": 0}}, "worker_groups.gpu.worker_cores: must be at least 1"),
        ({"gpu": {"max_workers": -1}}, "worker_groups.gpu.max_workers: must be at least 0"),
        ({"gpu": {"backend": {"image": "x"}}}, "worker_groups.gpu.backend.image: not a cluster"),
        (
            {"gpu": {"backend": {"worker_cores": 2}}},
            "worker_groups.gpu.backend.worker_cores: set it on the group itself",
        ),
        (
            {"gpu": {"backend": {"worker_groups": {}}}},
            "worker_groups.gpu.backend.worker_groups: set it in [cluster]",
        ),
        (
            {"gpu": {"backend": {"partition": 3}}},
            "worker_groups.gpu.partition: expected str, got int",
        ),
        ({"gpu": {"cores": 2}}, "worker_groups.gpu.cores: unknown key"),
    ],
)
def test_bad_group_declarations_are_refused_naming_the_key(
    groups: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        structure({"worker_groups": groups}, PartitionedConfig)
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_an_unknown_enabled_group_is_refused_naming_the_groups() -> None:
    with pytest.raises(ConfigError, match=r"enabled_worker_groups\[0\]: no worker group 'tpu'"):
        structure({"worker_groups": {"gpu": {}}, "enabled_worker_groups": ["tpu"]}, ClusterConfig)


def test_groups_load_from_the_cluster_table_of_the_file() -> None:
    config = load_config({"cluster": {"worker_groups": {"gpu": {"worker_cores": 4}}}}, environ={})
    cluster = structure(config.cluster, ClusterConfig, path="cluster")
    assert cluster.for_group("gpu").worker_cores == 4


def test_worker_names_carry_their_group() -> None:
    default = worker_name("c0ffee")
    gpu = worker_name("c0ffee", "gpu-a100")
    assert default.startswith("c0ffee-") and gpu.startswith("c0ffee-gpu-a100-")
    assert group_of_worker("c0ffee", default) == "default"
    assert group_of_worker("c0ffee", gpu) == "gpu-a100"
    assert group_of_worker("c0ffee", "someone-else") == "default"
