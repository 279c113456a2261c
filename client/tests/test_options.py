"""Options built from field specs: defaults, access, validation messages, display, widgets."""

from __future__ import annotations

import pytest
from fakes import OPTIONS_SPEC

from gateway_client import Options
from gateway_client.options import AnyField, Integer, field_from_spec

pytestmark = pytest.mark.unit


@pytest.fixture
def options() -> Options:
    return Options.from_spec(OPTIONS_SPEC)


def test_defaults_and_access(options: Options) -> None:
    assert list(options) == ["worker_cores", "worker_memory", "image", "gpu", "environment", "env"]
    assert len(options) == 6
    assert options.worker_cores == options["worker_cores"] == 1
    assert isinstance(options.worker_memory, float)
    options.worker_cores = 2
    options["image"] = "custom:1"
    options.update(gpu=True, env={"A": "1"})
    assert dict(options) == {
        "worker_cores": 2,
        "worker_memory": 2.0,
        "image": "custom:1",
        "gpu": True,
        "environment": "basic",
        "env": {"A": "1"},
    }
    options.worker_memory = 4  # an int is fine for a float
    assert options.worker_memory == 4.0 and isinstance(options.worker_memory, float)
    assert "worker_cores" in dir(options)
    import copy

    clone = copy.copy(options)
    assert clone is not options and dict(clone) == dict(options)
    clone.worker_cores = 4
    clone.env["B"] = "2"
    assert options.worker_cores == 2 and options.env == {"A": "1"}
    assert copy.deepcopy(options).env == {"A": "1"}
    options.reset()
    assert options.worker_cores == 1 and options.env == {}
    assert options.field("worker_cores").label == "Worker Cores"


@pytest.mark.parametrize(
    ("key", "value", "error", "message"),
    [
        ("worker_cores", 8, ValueError, r"worker_cores must be between 1 and 4, got 8"),
        ("worker_cores", 0, ValueError, r"worker_cores must be between 1 and 4, got 0"),
        ("worker_cores", 2.5, TypeError, r"worker_cores must be an integer, got 2.5"),
        ("worker_cores", True, TypeError, r"worker_cores must be an integer, got True"),
        ("worker_memory", 9, ValueError, r"worker_memory must be between 1.0 and 8.0, got 9"),
        ("worker_memory", "2G", TypeError, r"worker_memory must be a number"),
        ("image", 3, TypeError, r"image must be a string, got 3"),
        ("gpu", "yes", TypeError, r"gpu must be True or False, got 'yes'"),
        ("environment", "gpu", ValueError, r"environment must be one of 'basic', 'ml', got 'gpu'"),
        ("env", ["A"], TypeError, r"env must be a mapping \(dict\), got list"),
        ("env", {"A": object()}, ValueError, r"env must be JSON-serializable"),
    ],
)
def test_invalid_values_are_refused_with_the_field_and_bounds(
    options: Options, key: str, value: object, error: type[Exception], message: str
) -> None:
    before = options[key]
    with pytest.raises(error, match=message):
        options[key] = value
    with pytest.raises(error, match=message):
        setattr(options, key, value)
    assert options[key] == before


def test_unknown_options_and_deletion(options: Options) -> None:
    with pytest.raises(
        AttributeError, match="no option 'worker_gpus'; available options: worker_cores"
    ):
        options.worker_gpus = 1
    with pytest.raises(AttributeError):
        _ = options.worker_gpus
    with pytest.raises(KeyError, match="worker_gpus"):
        options["worker_gpus"]
    with pytest.raises(TypeError, match="cannot be removed"):
        del options["image"]
    with pytest.raises(TypeError, match="cannot be removed"):
        del options.image


def test_one_sided_bounds_and_unbounded() -> None:
    low = Integer(field="n", default=1, min=1)
    with pytest.raises(ValueError, match="n must be at least 1, got 0"):
        low.set(0)
    high = field_from_spec(
        {
            "field": "x",
            "label": "X",
            "default": 1.0,
            "spec": {"type": "float", "min": None, "max": 2},
        }
    )
    with pytest.raises(ValueError, match=r"x must be at most 2\.0, got 3"):
        high.set(3)
    free = Integer(field="m", default=-5)
    free.set(10**12)
    assert free.value == 10**12 and free.constraint() == "int"


def test_bad_server_defaults_and_unknown_types() -> None:
    with pytest.raises(
        ValueError, match="default for worker_cores is invalid: worker_cores must be between"
    ):
        field_from_spec(
            {
                "field": "worker_cores",
                "label": "c",
                "default": 9,
                "spec": {"type": "int", "min": 1, "max": 4},
            }
        )
    with pytest.raises(ValueError, match="no choices for profile"):
        field_from_spec(
            {
                "field": "profile",
                "label": "p",
                "default": "a",
                "spec": {"type": "select", "options": []},
            }
        )
    future = field_from_spec(
        {
            "field": "when",
            "label": "When",
            "default": "soon",
            "spec": {"type": "datetime", "tz": "UTC"},
        }
    )
    assert isinstance(future, AnyField)
    future.set({"anything": 1})  # the server checks types this client does not know
    assert future.value == {"anything": 1}


def test_repr_and_html(options: Options) -> None:
    assert repr(options).startswith(
        "Options<worker_cores=1, worker_memory=2.0, image='dask:latest'"
    )
    page = options._repr_html_()
    assert (
        "Worker Cores" in page
        and "int from 1 to 4" in page
        and "one of &#x27;basic&#x27;, &#x27;ml&#x27;" in page
    )


def test_widget_is_bound_both_ways(options: Options) -> None:
    widget = options._widget()
    assert widget is options._widget()  # built once
    grid = widget.children[1]
    cells = {}
    for label, control, status in zip(*[iter(grid.children)] * 3, strict=True):
        cells[label.value] = (control, status)
    cores, _ = cells["<b>Worker Cores:</b>"]
    assert (cores.min, cores.max, cores.value) == (1, 4, 1)
    cores.value = 3
    assert options.worker_cores == 3
    options.worker_cores = 2
    assert cores.value == 2

    env, env_status = cells["<b>Environment variables:</b>"]
    env.value = "A: '1'\nB: two"
    assert options.env == {"A": "1", "B": "two"}
    env.value = "[1, 2"
    assert "flow sequence" in env_status.value or "expected" in env_status.value
    assert options.env == {"A": "1", "B": "two"}
    env.value = "- a list"
    assert "must be a mapping" in env_status.value
    options.env = {"C": "3"}
    assert env.value.strip() == "C: '3'"

    choice, _ = cells["<b>Environment:</b>"]
    choice.value = "ml"
    assert options.environment == "ml"
