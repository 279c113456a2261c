"""Tests of user options: field declarations, the wire spec, validation and target mapping, and
building a form from `[options.<field>]` tables.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway_core.config import ConfigError, load_config
from gateway_core.models import User
from gateway_core.options import (
    Bool,
    FieldError,
    Float,
    Integer,
    Mapping,
    Options,
    OptionsError,
    Select,
    String,
)

pytestmark = pytest.mark.unit


def form() -> Options:
    return Options(
        fields=[
            Integer(field="worker_cores", default=1, min=1, max=4, label="Worker Cores"),
            Float(field="worker_memory", default=1, min=0.5, max=8, target="memory_gib"),
            String(field="image", default="dask:latest"),
            Bool(field="debug"),
            Select(field="env", options=[("small", "/envs/s"), ("big", {"path": "/envs/b"})]),
            Mapping(field="environment"),
        ]
    )


def problems(exc: pytest.ExceptionInfo[OptionsError]) -> str:
    return "\n".join(exc.value.problems)


# --------------------------------------------------------------------------------------------
# The wire spec
# --------------------------------------------------------------------------------------------


def test_spec_json_has_the_protocol_shape() -> None:
    assert form().spec_json() == [
        {
            "field": "worker_cores",
            "label": "Worker Cores",
            "default": 1,
            "spec": {"type": "int", "min": 1, "max": 4},
        },
        {
            "field": "worker_memory",
            "label": "worker_memory",
            "default": 1.0,
            "spec": {"type": "float", "min": 0.5, "max": 8},
        },
        {"field": "image", "label": "image", "default": "dask:latest", "spec": {"type": "string"}},
        {"field": "debug", "label": "debug", "default": False, "spec": {"type": "bool"}},
        {
            "field": "env",
            "label": "env",
            "default": "small",
            "spec": {"type": "select", "options": ["small", "big"]},
        },
        {
            "field": "environment",
            "label": "environment",
            "default": {},
            "spec": {"type": "mapping"},
        },
    ]


def test_unbounded_numbers_have_null_bounds() -> None:
    spec = Options(fields=[Integer(field="n"), Float(field="x")]).spec_json()
    assert [s["spec"] for s in spec] == [
        {"type": "int", "min": None, "max": None},
        {"type": "float", "min": None, "max": None},
    ]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_validate_fills_in_defaults() -> None:
    assert form().validate({}) == {
        "worker_cores": 1,
        "worker_memory": 1.0,
        "image": "dask:latest",
        "debug": False,
        "env": "small",
        "environment": {},
    }
    assert form().validate(None)["worker_cores"] == 1


def test_validate_keeps_given_values() -> None:
    out = form().validate(
        {
            "worker_cores": 4,
            "worker_memory": 2,
            "debug": True,
            "env": "big",
            "environment": {"A": "1"},
        }
    )
    assert out["worker_cores"] == 4
    assert out["worker_memory"] == 2.0 and isinstance(out["worker_memory"], float)
    assert out["debug"] is True
    assert out["env"] == "big"
    assert out["environment"] == {"A": "1"}


def test_unknown_field_is_named() -> None:
    with pytest.raises(OptionsError) as exc:
        form().validate({"worker_gpus": 2})
    assert "unknown option 'worker_gpus'" in problems(exc)
    assert "worker_cores" in problems(exc)  # the known ones are listed


def test_unknown_field_without_any_options() -> None:
    with pytest.raises(OptionsError) as exc:
        Options().validate({"x": 1})
    assert "unknown option 'x'; this gateway declares no options" in problems(exc)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("worker_cores", True, "worker_cores: expected int, got bool"),
        ("worker_cores", 2.0, "worker_cores: expected int, got float"),
        ("worker_cores", "2", "worker_cores: expected int, got string"),
        ("worker_memory", "1", "worker_memory: expected float, got string"),
        ("worker_memory", False, "worker_memory: expected float, got bool"),
        ("worker_memory", float("nan"), "worker_memory: expected a finite number"),
        ("image", 3, "image: expected string, got int"),
        ("debug", 1, "debug: expected bool, got int"),
        ("env", 1, "env: expected string (one of small, big), got int"),
        ("environment", ["a"], "environment: expected mapping (a JSON object), got array"),
        ("environment", {1: "a"}, "environment: keys must be strings"),
    ],
)
def test_wrong_types_name_the_field_and_type(name: str, value: Any, expected: str) -> None:
    with pytest.raises(OptionsError) as exc:
        form().validate({name: value})
    assert expected in problems(exc)


def test_int_is_accepted_for_float() -> None:
    assert form().validate({"worker_memory": 3})["worker_memory"] == 3.0


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("worker_cores", 0, "worker_cores: 0 is below the minimum of 1"),
        ("worker_cores", 5, "worker_cores: 5 is above the maximum of 4"),
        ("worker_memory", 0.25, "worker_memory: 0.25 is below the minimum of 0.5"),
        ("worker_memory", 9, "worker_memory: 9.0 is above the maximum of 8"),
    ],
)
def test_out_of_bounds_names_the_bound(name: str, value: Any, expected: str) -> None:
    with pytest.raises(OptionsError) as exc:
        form().validate({name: value})
    assert expected in problems(exc)


def test_bounds_are_inclusive() -> None:
    out = form().validate({"worker_cores": 4, "worker_memory": 0.5})
    assert (out["worker_cores"], out["worker_memory"]) == (4, 0.5)


def test_select_value_must_be_a_key() -> None:
    with pytest.raises(OptionsError) as exc:
        form().validate({"env": "/envs/s"})
    assert "env: '/envs/s' is not one of small, big" in problems(exc)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(OptionsError) as exc:
        form().validate({"worker_cores": 9, "debug": "yes", "nope": 1})
    assert len(exc.value.problems) == 3


def test_options_must_be_an_object() -> None:
    with pytest.raises(OptionsError) as exc:
        form().validate([1, 2])
    assert "cluster_options: expected an object, got array" in problems(exc)


def test_validate_does_not_share_the_mapping_default() -> None:
    f = Options(fields=[Mapping(field="env", default={"A": "1"})])
    first = f.validate({})
    first["env"]["B"] = "2"
    assert f.validate({})["env"] == {"A": "1"}


# --------------------------------------------------------------------------------------------
# Targets and handler
# --------------------------------------------------------------------------------------------


def test_targets_map_names_and_select_values() -> None:
    f = form()
    targets = f.targets(f.validate({"env": "big"}))
    assert targets["memory_gib"] == 1.0
    assert "worker_memory" not in targets
    assert targets["env"] == {"path": "/envs/b"}
    assert targets["worker_cores"] == 1


async def test_overrides_use_targets_without_handler() -> None:
    f = form()
    normalized = f.validate({})
    assert await f.overrides(normalized, User(name="a")) == f.targets(normalized)


async def test_overrides_call_the_handler_sync_or_async() -> None:
    def sync(options: Any, user: User) -> dict[str, Any]:
        return {"worker_memory": int(options["gib"] * 2**30), "who": user.name}

    async def asynchronous(options: Any, user: User) -> dict[str, Any]:
        return {"worker_cores": options["gib"] * 2}

    fields = [Float(field="gib", default=1)]
    alice = User(name="alice")
    out = await Options(fields=fields, handler=sync).overrides({"gib": 2.0}, alice)
    assert out == {"worker_memory": 2 * 2**30, "who": "alice"}
    out = await Options(fields=fields, handler=asynchronous).overrides({"gib": 2.0}, alice)
    assert out == {"worker_cores": 4.0}


async def test_handler_must_return_a_mapping() -> None:
    f = Options(fields=[Bool(field="x")], handler=lambda options, user: [1])
    with pytest.raises(TypeError, match="expected a mapping"):
        await f.overrides({"x": False}, User(name="a"))


# --------------------------------------------------------------------------------------------
# Declaring fields in Python
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "key", "message"),
    [
        (lambda: Integer(field="not valid"), "field", "not a valid Python identifier"),
        (lambda: Integer(field="x", target="a-b"), "target", "not a valid Python identifier"),
        (lambda: Integer(field="x", min=3, max=1), "min", "min (3) is greater than max (1)"),
        (lambda: Integer(field="x", default=5, max=4), "default", "above the maximum of 4"),
        (lambda: Integer(field="x", min=1.5), "min", "expected an int or null, got float"),
        (lambda: Float(field="x", max=float("inf")), "max", "finite"),
        (lambda: Bool(field="x", default=1), "default", "expected bool, got int"),
        (lambda: Select(field="x", options=[]), "options", "at least one choice"),
        (lambda: Select(field="x", options=["a", "a"]), "options", "duplicate keys: a"),
        (lambda: Select(field="x", options=[1]), "options", "choice 0 must be a string key"),
        (lambda: Select(field="x", options=["a"], default="b"), "default", "'b' is not one of a"),
        (lambda: Mapping(field="x", default=[1]), "default", "expected mapping"),
    ],
)
def test_bad_field_declarations(make: Any, key: str, message: str) -> None:
    with pytest.raises(FieldError) as exc:
        make()
    assert exc.value.key == key
    assert message in exc.value.message


def test_duplicate_fields_and_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate option field 'a'"):
        Options(fields=[Bool(field="a"), Bool(field="a")])
    with pytest.raises(ValueError, match="both target 't'"):
        Options(fields=[Bool(field="a", target="t"), Bool(field="b", target="t")])


def test_select_default_is_the_first_key() -> None:
    assert Select(field="x", options=["b", "a"]).default == "b"


# --------------------------------------------------------------------------------------------
# From the config file
# --------------------------------------------------------------------------------------------


def from_toml(options: dict[str, Any]) -> Options:
    return Options.from_config(load_config({"options": options}).options)


def test_from_config_builds_every_type() -> None:
    f = from_toml(
        {
            "worker_cores": {"type": "int", "min": 1, "max": 8, "default": 2, "label": "Cores"},
            "worker_memory": {"type": "float", "min": 1, "max": 16, "target": "mem"},
            "image": {"type": "string", "default": "x"},
            "debug": {"type": "bool", "default": True},
            "profile": {
                "type": "select",
                "options": ["small", {"key": "big", "value": {"worker_cores": 4}}],
                "default": "big",
            },
            "env": {"type": "mapping", "default": {"A": "1"}},
        }
    )
    spec = {s["field"]: s for s in f.spec_json()}
    assert spec["worker_cores"] == {
        "field": "worker_cores",
        "label": "Cores",
        "default": 2,
        "spec": {"type": "int", "min": 1, "max": 8},
    }
    assert isinstance(spec["worker_cores"]["spec"]["min"], int)
    assert spec["worker_memory"]["default"] == 1.0  # implicit 0 clamped into the bounds
    assert spec["profile"]["spec"] == {"type": "select", "options": ["small", "big"]}
    assert spec["profile"]["default"] == "big"
    assert spec["env"]["default"] == {"A": "1"}
    assert f.targets(f.validate({}))["profile"] == {"worker_cores": 4}
    assert "mem" in f.targets(f.validate({}))


def test_from_config_empty() -> None:
    assert from_toml({}).spec_json() == []


@pytest.mark.parametrize(
    ("decl", "expected"),
    [
        ({"type": "integer"}, "options.f.type: unknown type 'integer'; expected one of int,"),
        ({"type": "int", "min": 5, "max": 1}, "options.f.min: min (5) is greater than max (1)"),
        ({"type": "int", "min": 1.5}, "options.f.min: expected an integer for an int option"),
        ({"type": "int", "default": 9, "max": 4}, "options.f.default: 9 is above the maximum"),
        ({"type": "int", "default": "2"}, "options.f.default: expected int, got string"),
        ({"type": "float", "default": 0.1, "min": 1}, "options.f.default: 0.1 is below"),
        ({"type": "string", "min": 1}, "options.f.min: not allowed for type string"),
        ({"type": "bool", "options": ["a"]}, "options.f.options: not allowed for type bool"),
        ({"type": "select"}, "options.f.options: must list at least one choice"),
        (
            {"type": "select", "options": ["a", "b"], "default": "c"},
            "options.f.default: 'c' is not one of a, b",
        ),
        (
            {"type": "select", "options": [{"key": "a"}]},
            "options.f.options: choice 0 must be a string or a table with exactly `key`",
        ),
        ({"type": "mapping", "default": 3}, "options.f.default: expected mapping"),
        ({"type": "int", "target": "not-ok"}, "options.f.target: 'not-ok' is not a valid"),
    ],
)
def test_from_config_errors_name_the_key(decl: dict[str, Any], expected: str) -> None:
    with pytest.raises(OptionsError) as exc:
        from_toml({"f": decl})
    assert any(p.startswith(expected) for p in exc.value.problems), exc.value.problems


def test_from_config_reports_every_bad_declaration() -> None:
    with pytest.raises(OptionsError) as exc:
        from_toml(
            {
                "a": {"type": "nope"},
                "b": {"type": "int", "default": True},
                "c": {"type": "int", "target": "x"},
                "d": {"type": "int", "target": "x"},
            }
        )
    assert exc.value.problems == [
        "options.a.type: unknown type 'nope'; expected one of int, float, string, bool, select, "
        "mapping",
        "options.b.default: expected int, got bool",
        "options.d.target: 'x' is already the target of options.c",
    ]


def test_field_names_must_be_identifiers_in_config() -> None:
    with pytest.raises(OptionsError) as exc:
        from_toml({"worker-cores": {"type": "int"}})
    assert exc.value.problems == [
        "options.worker-cores.field: 'worker-cores' is not a valid Python identifier"
    ]


def test_option_spec_type_errors_come_from_the_config_loader() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config({"options": {"f": {"type": "int", "min": "1"}}})
    assert "options.f.min" in str(exc.value)
