"""Tests of the plugin-manager factory, the registry and the plugin records the CLI shows.

Plugins are installed as fake distributions (dist-info folders on sys.path), so entry points are
found by importlib.metadata exactly as for real ones.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakedists import BACKEND_PLUGIN, FakeDists

from gateway_core import hookimpl
from gateway_core.config import load_config
from gateway_core.context import GatewayContext
from gateway_core.events import ClusterEvent
from gateway_core.hookcaller import GatewayHooks
from gateway_core.models import User
from gateway_core.options import Integer, Options
from gateway_core.plugins import (
    ENV_DISABLE_PLUGINS,
    PluginError,
    Registry,
    UnknownPluginError,
    make_plugin_manager,
    plugin_distribution,
    plugin_infos,
)
from gateway_core.specs import BackendSpec, ProxySpec

pytestmark = pytest.mark.unit


@pytest.fixture
def dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDists]:
    root = tmp_path / "site-packages"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(ENV_DISABLE_PLUGINS, raising=False)
    fake = FakeDists(root=root)
    yield fake
    fake.forget()


def add_backend_plugin(dists: FakeDists, dist: str, module: str, backend: str) -> None:
    entry_point = dist.removeprefix("gateway-")
    dists.add(
        dist,
        version="1.2.3",
        entry_points={entry_point: module},
        modules={module: BACKEND_PLUGIN.format(name=backend)},
    )


# --------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------


def test_entry_points_are_loaded_and_specs_name_their_plugin(dists: FakeDists) -> None:
    add_backend_plugin(dists, "gateway-queue", "gw_fake_queue", "queue")
    pm = make_plugin_manager()
    assert pm.has_plugin("queue")
    assert pm.sources["queue"] == "entry point"
    assert plugin_distribution(pm, "queue") == ("gateway-queue", "1.2.3")

    registry = Registry.from_plugin_manager(pm)
    spec = registry.backend("queue")
    assert spec.plugin == "queue"
    assert spec.config.__name__ == "QueueConfig"


def test_core_builtins_are_registered_as_the_core_plugin(dists: FakeDists) -> None:
    pm = make_plugin_manager(entry_points=False)
    assert pm.sources["core"] == "built-in"
    registry = Registry.from_plugin_manager(pm)
    simple = registry.authenticator("simple")
    assert simple.plugin == "core"
    assert simple.config.__name__ == "SimpleAuthConfig"
    assert plugin_distribution(pm, "core")[0] == "gateway-core"


def test_entry_points_can_be_left_out(dists: FakeDists) -> None:
    add_backend_plugin(dists, "gateway-queue", "gw_fake_queue2", "queue")
    pm = make_plugin_manager(entry_points=False)
    assert not pm.has_plugin("queue")
    assert "queue" not in Registry.from_plugin_manager(pm).backends


def test_environment_blocks_plugins(dists: FakeDists, monkeypatch: pytest.MonkeyPatch) -> None:
    add_backend_plugin(dists, "gateway-queue", "gw_fake_queue3", "queue")
    monkeypatch.setenv(ENV_DISABLE_PLUGINS, " queue , nothing-by-this-name,")
    pm = make_plugin_manager()
    assert pm.is_blocked("queue")
    assert not pm.has_plugin("queue")
    assert "gw_fake_queue3" not in sys.modules, "a blocked plugin must not even be imported"
    assert pm.blocked == ["queue", "nothing-by-this-name"]

    registry = Registry.from_plugin_manager(pm)
    with pytest.raises(UnknownPluginError) as info:
        registry.backend("queue")
    assert f"plugin 'queue' is disabled by {ENV_DISABLE_PLUGINS}" in str(info.value)

    blocked = {i.name: i for i in plugin_infos(pm, registry) if i.status == "blocked"}
    assert blocked["queue"].distribution == "gateway-queue"
    assert blocked["queue"].version == "1.2.3"
    assert "nothing-by-this-name" in blocked


def test_disabled_argument_overrides_the_environment(
    dists: FakeDists, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_backend_plugin(dists, "gateway-queue", "gw_fake_queue4", "queue")
    monkeypatch.setenv(ENV_DISABLE_PLUGINS, "queue")
    pm = make_plugin_manager(disabled=[])
    assert pm.has_plugin("queue")


def test_a_plugin_failing_to_import_is_reported_not_fatal(dists: FakeDists) -> None:
    dists.add(
        "gateway-brokenq",
        version="0.4",
        entry_points={"brokenq": "gw_fake_brokenq"},
        modules={"gw_fake_brokenq": "import gw_a_module_that_is_not_installed\n"},
    )
    add_backend_plugin(dists, "gateway-queue", "gw_fake_queue5", "queue")
    pm = make_plugin_manager()

    assert pm.has_plugin("queue"), "the healthy plugin still loads"
    assert not pm.has_plugin("brokenq")
    [failure] = [f for f in pm.failures if f.name == "brokenq"]
    assert failure.distribution == "gateway-brokenq"
    assert failure.version == "0.4"
    assert "gw_a_module_that_is_not_installed" in failure.error
    assert failure.error.startswith("ModuleNotFoundError")

    registry = Registry.from_plugin_manager(pm)
    assert registry.backend("queue").plugin == "queue"
    infos = {i.name: i for i in plugin_infos(pm, registry)}
    assert infos["brokenq"].status == "failed"
    assert "gw_a_module_that_is_not_installed" in infos["brokenq"].error
    assert infos["queue"].status == "ok"


def test_selecting_a_name_a_failed_plugin_provides_names_the_failure(dists: FakeDists) -> None:
    dists.add(
        "gateway-brokenq",
        version="0.4",
        entry_points={"brokenq": "gw_fake_brokenq2"},
        modules={"gw_fake_brokenq2": "raise RuntimeError('needs libqueue.so')\n"},
    )
    registry = Registry.from_plugin_manager(make_plugin_manager())
    with pytest.raises(UnknownPluginError) as info:
        registry.backend("brokenq")
    message = str(info.value)
    assert "no backend named 'brokenq'" in message
    assert "plugin 'brokenq' (gateway-brokenq 0.4) failed to load" in message
    assert "RuntimeError: needs libqueue.so" in message


def test_an_unknown_name_lists_what_is_available(dists: FakeDists) -> None:
    add_backend_plugin(dists, "gateway-queue", "gw_fake_queue6", "queue")
    registry = Registry.from_plugin_manager(make_plugin_manager())
    with pytest.raises(
        UnknownPluginError, match=r"no backend named 'grid-engine'.*available: .*queue"
    ):
        registry.backend("grid-engine")
    # A name no distribution of the monorepo registers (kerberos now has its plugin).
    with pytest.raises(UnknownPluginError, match=r"no authenticator named 'radius'.*simple"):
        registry.authenticator("radius")
    with pytest.raises(UnknownPluginError, match=r"no proxy named 'nginx'"):
        registry.proxy("nginx")


def test_duplicate_names_name_both_plugins_and_distributions(dists: FakeDists) -> None:
    add_backend_plugin(dists, "gateway-queue", "gw_fake_queue7", "batch")
    add_backend_plugin(dists, "gateway-otherq", "gw_fake_otherq", "batch")
    pm = make_plugin_manager()
    with pytest.raises(PluginError) as info:
        Registry.from_plugin_manager(pm)
    message = str(info.value)
    assert "backend 'batch' is registered twice" in message
    assert "plugin 'queue' (gateway-queue 1.2.3)" in message
    assert "plugin 'otherq' (gateway-otherq 1.2.3)" in message


def test_two_distributions_with_one_entry_point_name(dists: FakeDists) -> None:
    dists.add(
        "gateway-first",
        entry_points={"same": "gw_fake_first"},
        modules={"gw_fake_first": BACKEND_PLUGIN.format(name="first")},
    )
    dists.add(
        "gateway-second",
        entry_points={"same": "gw_fake_second"},
        modules={"gw_fake_second": BACKEND_PLUGIN.format(name="second")},
    )
    pm = make_plugin_manager()
    assert pm.has_plugin("same")
    [failure] = [f for f in pm.failures if f.name == "same"]
    assert "already used by" in failure.error
    loaded = plugin_distribution(pm, "same")[0]
    assert {loaded, failure.distribution} == {"gateway-first", "gateway-second"}


def test_check_pending_names_a_plugin_with_a_misspelled_hook(dists: FakeDists) -> None:
    dists.add(
        "gateway-typo",
        version="2.0",
        entry_points={"typo": "gw_fake_typo"},
        modules={
            "gw_fake_typo": """
                from gateway_core import hookimpl

                @hookimpl
                def gateway_register_backend():
                    return []
            """
        },
    )
    with pytest.raises(PluginError) as info:
        make_plugin_manager()
    message = str(info.value)
    assert "plugin 'typo' (gateway-typo 2.0)" in message
    assert "unknown hook 'gateway_register_backend'" in message
    assert "did you mean 'gateway_register_backends'" in message
    assert f"{ENV_DISABLE_PLUGINS}=typo" in message


def test_a_blocked_plugin_with_a_misspelled_hook_is_not_checked(
    dists: FakeDists, monkeypatch: pytest.MonkeyPatch
) -> None:
    dists.add(
        "gateway-typo",
        entry_points={"typo": "gw_fake_typo2"},
        modules={
            "gw_fake_typo2": "from gateway_core import hookimpl\n\n"
            "@hookimpl\ndef gateway_frobnicate():\n    return 1\n"
        },
    )
    monkeypatch.setenv(ENV_DISABLE_PLUGINS, "typo")
    assert make_plugin_manager().is_blocked("typo")


def test_a_hook_with_a_parameter_the_spec_lacks_is_a_load_failure(dists: FakeDists) -> None:
    dists.add(
        "gateway-badargs",
        entry_points={"badargs": "gw_fake_badargs"},
        modules={
            "gw_fake_badargs": """
                from gateway_core import hookimpl

                @hookimpl
                def gateway_register_backends(config):
                    return []
            """
        },
    )
    pm = make_plugin_manager()
    [failure] = [f for f in pm.failures if f.name == "badargs"]
    assert failure.error.startswith("PluginValidationError")
    assert "config" in failure.error
    assert "\n" not in failure.error


class MisspelledObserver:
    @hookimpl
    def gateway_cluster_events(self, event: ClusterEvent) -> None:
        """Misspelled on purpose (the hook is gateway_cluster_event)."""


def test_check_pending_covers_plugin_objects(dists: FakeDists) -> None:
    observer = MisspelledObserver()
    with pytest.raises(PluginError, match="unknown hook 'gateway_cluster_events'"):
        make_plugin_manager(entry_points=False, extra_plugins=[observer])


# --------------------------------------------------------------------------------------------
# Local plugin modules (`plugins = [...]` in the config)
# --------------------------------------------------------------------------------------------

SITE_POLICY = """
from gateway_core import hookimpl
from gateway_core.options import Integer, Options


@hookimpl
def gateway_cluster_options(user, config):
    if "gpu" in user.groups:
        return Options(fields=[Integer(field="worker_cores", default=2, min=1, max=8)])
    return None
"""


def test_local_plugin_modules_are_registered(dists: FakeDists, tmp_path: Path) -> None:
    site = tmp_path / "etc-gateway"
    site.mkdir()
    (site / "gw_site_policy.py").write_text(SITE_POLICY)
    dists.modules.append("gw_site_policy")
    before = list(sys.path)

    pm = make_plugin_manager(
        entry_points=False, local_plugins=["gw_site_policy"], local_plugin_path=[site]
    )
    assert sys.path == before, "the search path is only used while importing"
    assert pm.has_plugin("gw_site_policy")
    assert pm.sources["gw_site_policy"] == "local"

    config = load_config({"options": {"worker_cores": {"type": "int", "default": 1}}})
    gpu_form = pm.hook.gateway_cluster_options(user=User(name="a", groups={"gpu"}), config=config)
    assert gpu_form.defaults() == {"worker_cores": 2}
    plain_form = pm.hook.gateway_cluster_options(user=User(name="b"), config=config)
    assert plain_form.defaults() == {"worker_cores": 1}, "core's [options] form is the fallback"

    infos = {i.name: i for i in plugin_infos(pm, Registry.from_plugin_manager(pm))}
    assert infos["gw_site_policy"].hooks == ["gateway_cluster_options"]
    assert infos["gw_site_policy"].source == "local"


def test_a_local_plugin_that_cannot_be_imported_is_an_error_naming_it(dists: FakeDists) -> None:
    with pytest.raises(PluginError) as info:
        make_plugin_manager(entry_points=False, local_plugins=["gw_no_such_site_module"])
    assert "plugin module 'gw_no_such_site_module' listed in `plugins` cannot be imported" in str(
        info.value
    )


def test_a_local_plugin_raising_on_import_is_an_error_naming_it(dists: FakeDists) -> None:
    dists.write_module("gw_site_raises", "raise ValueError('bad site setting')\n")
    with pytest.raises(PluginError, match=r"'gw_site_raises'.*ValueError: bad site setting"):
        make_plugin_manager(entry_points=False, local_plugins=["gw_site_raises"])


# --------------------------------------------------------------------------------------------
# Registration hooks that misbehave
# --------------------------------------------------------------------------------------------


class RaisingRegistration:
    __name__ = "raising"

    @hookimpl
    def gateway_register_backends(self) -> list[BackendSpec]:
        raise RuntimeError("cannot reach the scheduler service")


class WrongType:
    __name__ = "wrongtype"

    @hookimpl
    def gateway_register_proxies(self) -> object:
        return {"name": "not a spec"}


def test_a_failing_registration_hook_is_reported_not_fatal(dists: FakeDists) -> None:
    pm = make_plugin_manager(entry_points=False, extra_plugins=[RaisingRegistration(), WrongType()])
    registry = Registry.from_plugin_manager(pm)
    errors = {f.name: f.error for f in registry.failures}
    assert errors["raising"] == (
        "gateway_register_backends: RuntimeError: cannot reach the scheduler service"
    )
    assert "gateway_register_proxies must return a list of ProxySpec" in errors["wrongtype"]
    assert registry.authenticator("simple").plugin == "core"
    with pytest.raises(UnknownPluginError, match=r"plugin 'raising'.*cannot reach"):
        registry.backend("raising")
    infos = {i.name: i for i in plugin_infos(pm, registry)}
    assert infos["raising"].status == "failed"
    assert infos["raising"].source == "extra"


class ProxyPlugin:
    __name__ = "edgeproxy"

    @hookimpl
    def gateway_register_proxies(self) -> list[ProxySpec]:
        from gateway_core.proxies import Proxy

        return [ProxySpec(name="edge", proxy=Proxy, description="test proxy")]


def test_plugin_infos_list_kinds_hooks_and_sources(dists: FakeDists) -> None:
    add_backend_plugin(dists, "gateway-queue", "gw_fake_queue8", "queue")
    pm = make_plugin_manager(extra_plugins=[ProxyPlugin()])
    registry = Registry.from_plugin_manager(pm)
    assert registry.proxy("edge").plugin == "edgeproxy"
    infos = {i.name: i for i in plugin_infos(pm, registry)}

    assert infos["queue"].kinds == ["backend:queue"]
    assert infos["queue"].to_json() == {
        "name": "queue",
        "kinds": ["backend:queue"],
        "hooks": ["gateway_register_backends"],
        "distribution": "gateway-queue",
        "version": "1.2.3",
        "source": "entry point",
        "status": "ok",
        "error": "",
    }
    assert infos["core"].kinds == [
        "backend:local",
        "backend:unsafe-local",
        "authenticator:simple",
    ]
    assert "gateway_cluster_options" in infos["core"].hooks
    assert infos["edgeproxy"].kinds == ["proxy:edge"]
    assert infos["edgeproxy"].distribution == ""


# --------------------------------------------------------------------------------------------
# Hooks called through the manager
# --------------------------------------------------------------------------------------------


class GroupOptions:
    __name__ = "groupoptions"

    @hookimpl
    def gateway_cluster_options(self, user: User, config: object) -> Options | None:
        if user.admin:
            return Options(fields=[Integer(field="worker_cores", default=4, min=1, max=64)])
        return None


def test_builtin_cluster_options_come_last(dists: FakeDists) -> None:
    pm = make_plugin_manager(entry_points=False, extra_plugins=[GroupOptions()])
    config = load_config({"options": {"worker_cores": {"type": "int", "default": 1, "max": 2}}})
    admin = pm.hook.gateway_cluster_options(user=User(name="root", admin=True), config=config)
    assert admin.defaults() == {"worker_cores": 4}
    user = pm.hook.gateway_cluster_options(user=User(name="bob"), config=config)
    assert user.spec_json()[0]["spec"] == {"type": "int", "min": None, "max": 2}
    empty = pm.hook.gateway_cluster_options(user=User(name="bob"), config=load_config({}))
    assert empty.fields == ()


class Recorder:
    __name__ = "recorder"

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def gateway_cluster_event(self, event: ClusterEvent) -> None:
        self.seen.append(f"{event.kind}:{event.cluster_name}")


class Exploding:
    __name__ = "exploding"

    @hookimpl
    def gateway_cluster_event(self, event: ClusterEvent) -> None:
        raise RuntimeError("observer bug")


def test_cluster_event_observers_get_events_and_cannot_break_the_gateway(
    dists: FakeDists, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    pm = make_plugin_manager(entry_points=False, extra_plugins=[recorder])
    context = GatewayContext(config=load_config({}), hook=GatewayHooks.from_plugin_manager(pm))
    context.emit(ClusterEvent(kind="created", cluster_name="c1", username="alice"))
    assert recorder.seen == ["created:c1"]

    # pluggy calls the last registered first: a raising observer registered after the
    # recorder is called before it; it is logged with its name and the recorder still hears.
    pm.register(Exploding())
    context.emit(ClusterEvent(kind="stopped", cluster_name="c1", username="alice"))
    assert recorder.seen == ["created:c1", "stopped:c1"]
    assert "observer of plugin 'exploding' failed for stopped c1" in caplog.text


def test_plugin_objects_are_registered_under_their_name(dists: FakeDists) -> None:
    module = types.ModuleType("gw_inline_plugin")
    pm = make_plugin_manager(entry_points=False, extra_plugins=[module])
    assert pm.get_plugin("gw_inline_plugin") is module
    assert pm.sources["gw_inline_plugin"] == "extra"
