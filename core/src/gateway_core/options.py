"""User options: the fields a user may set when creating a cluster, and their validation.

Owns the field classes (`Integer`, `Float`, `String`, `Bool`, `Select`, `Mapping`), `Options` (the
form, its wire spec, validation and target mapping), `OptionsError`, and building a form from the
`[options.<field>]` tables of the config.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Mapping as AbcMapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from attrs import Factory, define, field

if TYPE_CHECKING:
    from .config import OptionSpec
    from .models import User

__all__ = [
    "Bool",
    "Field",
    "FieldError",
    "Float",
    "Handler",
    "Integer",
    "Mapping",
    "Options",
    "OptionsError",
    "Select",
    "String",
]

OPTION_TYPES = ("int", "float", "string", "bool", "select", "mapping")
"""The ``type`` names of `[options.<field>]` tables, as on the wire."""


class OptionsError(ValueError):
    """A user's options (or a declaration of options) are invalid; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class FieldError(ValueError):
    """A field was declared wrongly; ``key`` names the bad argument (``default``, ``min``, ...)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages people read."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, AbcMapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_identifier(key: str, value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value.isidentifier()):
        raise FieldError(key, f"{value!r} is not a valid Python identifier")


# --------------------------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------------------------


@define(kw_only=True, frozen=True)
class Field:
    """One user option. ``field`` is the name users set; ``label`` the human title (defaults to
    ``field``); ``target`` the key the value is handed on as (defaults to ``field``).

    Subclasses define ``default`` and implement `check` (value → normalized value, raising
    ValueError with a message that does not repeat the field name).
    """

    type_name: ClassVar[str] = ""

    field: str
    label: str | None = None
    target: str | None = None

    def __attrs_post_init__(self) -> None:
        _check_identifier("field", self.field)
        _check_identifier("target", self.target)
        if self.label is not None and not isinstance(self.label, str):
            raise FieldError("label", f"expected a string, got {_kind(self.label)}")
        try:
            self.check(self.default_value)
        except ValueError as exc:
            raise FieldError("default", str(exc)) from None

    @property
    def default_value(self) -> Any:
        """The value used when the user does not set this field."""
        return getattr(self, "default")  # noqa: B009 - each subclass declares its own

    @property
    def target_name(self) -> str:
        return self.target or self.field

    def check(self, value: Any) -> Any:
        """Validate ``value``; return the normalized value or raise ValueError."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The ``"spec"`` object of this field on the wire."""
        return {"type": self.type_name}

    def target_value(self, value: Any) -> Any:
        """What a normalized value becomes in the target mapping."""
        return value

    def spec_json(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "label": self.label or self.field,
            "default": self.default_value,
            "spec": self.spec(),
        }


def _check_bounds(lo: Any, hi: Any, check: Callable[[Any], bool], kind: str) -> None:
    for key, bound in (("min", lo), ("max", hi)):
        if bound is not None and not check(bound):
            raise FieldError(key, f"expected {kind} or null, got {_kind(bound)}")
        if isinstance(bound, float) and not math.isfinite(bound):
            raise FieldError(key, f"must be a finite number, got {bound}")
    if lo is not None and hi is not None and lo > hi:
        raise FieldError("min", f"min ({lo}) is greater than max ({hi})")


def _widen(value: Any) -> Any:
    """Integers given as a Float default become floats; anything else is checked later."""
    return float(value) if _is_int(value) else value


def _empty_if_none(value: Any) -> Any:
    return {} if value is None else value


def _bounded(value: Any, lo: Any, hi: Any) -> Any:
    if lo is not None and value < lo:
        raise ValueError(f"{value} is below the minimum of {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{value} is above the maximum of {hi}")
    return value


@define(kw_only=True, frozen=True)
class Integer(Field):
    """An integer, with optional inclusive bounds. Booleans are not integers here."""

    type_name: ClassVar[str] = "int"

    default: int = 0
    min: int | None = None
    max: int | None = None

    def __attrs_post_init__(self) -> None:
        _check_bounds(self.min, self.max, _is_int, "an int")
        super().__attrs_post_init__()

    def check(self, value: Any) -> int:
        if not _is_int(value):
            raise ValueError(f"expected int, got {_kind(value)}")
        return int(_bounded(value, self.min, self.max))

    def spec(self) -> dict[str, Any]:
        return {"type": "int", "min": self.min, "max": self.max}


@define(kw_only=True, frozen=True)
class Float(Field):
    """A finite number, with optional inclusive bounds; integers are accepted and widened."""

    type_name: ClassVar[str] = "float"

    default: float = field(default=0.0, converter=_widen)
    min: float | None = None
    max: float | None = None

    def __attrs_post_init__(self) -> None:
        _check_bounds(self.min, self.max, _is_number, "a number")
        super().__attrs_post_init__()

    def check(self, value: Any) -> float:
        if not _is_number(value):
            raise ValueError(f"expected float, got {_kind(value)}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value}")
        return float(_bounded(number, self.min, self.max))

    def spec(self) -> dict[str, Any]:
        return {"type": "float", "min": self.min, "max": self.max}


@define(kw_only=True, frozen=True)
class String(Field):
    """A string."""

    type_name: ClassVar[str] = "string"

    default: str = ""

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected string, got {_kind(value)}")
        return value


@define(kw_only=True, frozen=True)
class Bool(Field):
    """A boolean (``true``/``false`` only; 0 and 1 are refused)."""

    type_name: ClassVar[str] = "bool"

    default: bool = False

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected bool, got {_kind(value)}")
        return value


def _select_choices(entries: Any) -> tuple[tuple[str, Any], ...]:
    """Normalize ``options`` of a Select: keys, or (key, value) pairs, into pairs."""
    if isinstance(entries, str | bytes) or not isinstance(entries, Iterable):
        raise FieldError("options", f"expected a list of choices, got {_kind(entries)}")
    pairs: list[tuple[str, Any]] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            pairs.append((entry, entry))
        elif isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], str):
            pairs.append((entry[0], entry[1]))
        else:
            raise FieldError(
                "options",
                f"choice {index} must be a string key or a (key, value) pair with a string key, "
                f"got {entry!r}",
            )
    keys = [k for k, _ in pairs]
    if not keys:
        raise FieldError("options", "must list at least one choice")
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise FieldError("options", f"duplicate keys: {', '.join(dupes)}")
    return tuple(pairs)


def _first_key(self: Select) -> str:
    return self.options[0][0]


@define(kw_only=True, frozen=True)
class Select(Field):
    """One of a list of choices. ``options`` holds keys, or (key, value) pairs where the value
    (any object) is what the target receives; users see and send only keys. ``default`` is a
    key, the first one when not given."""

    type_name: ClassVar[str] = "select"

    options: tuple[tuple[str, Any], ...] = field(converter=_select_choices)
    default: str = Factory(_first_key, takes_self=True)

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.options]

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected string (one of {', '.join(self.keys)}), got {_kind(value)}")
        if value not in self.keys:
            raise ValueError(f"{value!r} is not one of {', '.join(self.keys)}")
        return value

    def spec(self) -> dict[str, Any]:
        return {"type": "select", "options": self.keys}

    def target_value(self, value: Any) -> Any:
        return dict(self.options)[value]


@define(kw_only=True, frozen=True)
class Mapping(Field):
    """A JSON object with string keys (e.g. environment variables)."""

    type_name: ClassVar[str] = "mapping"

    default: dict[str, Any] = field(factory=dict, converter=_empty_if_none)

    def check(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, AbcMapping):
            raise ValueError(f"expected mapping (a JSON object), got {_kind(value)}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ValueError(f"keys must be strings, got {bad[0]!r}")
        return dict(value)

    def target_value(self, value: Any) -> Any:
        return dict(value)


# --------------------------------------------------------------------------------------------
# The form
# --------------------------------------------------------------------------------------------

Handler: TypeAlias = Callable[
    [AbcMapping[str, Any], "User"],
    "AbcMapping[str, Any] | Awaitable[AbcMapping[str, Any]]",
]
"""``handler(options, user)``: normalized options → cluster config overrides (or an awaitable)."""


def _field_tuple(value: Iterable[Field]) -> tuple[Field, ...]:
    return tuple(value)


@define(kw_only=True, frozen=True)
class Options:
    """The options form a user fills in: ``fields`` in display order, and an optional
    ``handler(options, user)`` turning normalized options into cluster config overrides (without
    one, each field's value goes to its ``target``, see `targets`).

    Example::

        Options(fields=[Integer(field="worker_cores", default=1, min=1, max=4),
                        Select(field="env", options=[("small", "/envs/s"), ("big", "/envs/b")],
                               target="environment_path")])
    """

    fields: tuple[Field, ...] = field(factory=tuple, converter=_field_tuple)
    handler: Handler | None = None

    def __attrs_post_init__(self) -> None:
        seen: dict[str, str] = {}
        targets: dict[str, str] = {}
        for f in self.fields:
            if not isinstance(f, Field):
                raise TypeError(f"Options fields must be Field instances, got {_kind(f)}")
            if f.field in seen:
                raise ValueError(f"duplicate option field {f.field!r}")
            seen[f.field] = f.field
            if f.target_name in targets:
                raise ValueError(
                    f"options {targets[f.target_name]!r} and {f.field!r} both target "
                    f"{f.target_name!r}"
                )
            targets[f.target_name] = f.field

    @property
    def names(self) -> list[str]:
        return [f.field for f in self.fields]

    def spec_json(self) -> list[dict[str, Any]]:
        """The ``cluster_options`` list of ``GET /api/v1/options`` (PROTOCOL.md field specs)."""
        return [f.spec_json() for f in self.fields]

    def defaults(self) -> dict[str, Any]:
        return {f.field: f.default_value for f in self.fields}

    def validate(self, user_options: Any) -> dict[str, Any]:
        """Normalize ``user_options`` (field → value): defaults filled in, types checked.

        Raises OptionsError listing every problem (unknown fields, wrong types, out of bounds).
        """
        if user_options is None:
            user_options = {}
        if not isinstance(user_options, AbcMapping):
            raise OptionsError([f"cluster_options: expected an object, got {_kind(user_options)}"])
        problems: list[str] = []
        known = set(self.names)
        unknown = sorted(str(k) for k in user_options if k not in known)
        for name in unknown:
            if known:
                problems.append(
                    f"unknown option {name!r}; known options are {', '.join(self.names)}"
                )
            else:
                problems.append(f"unknown option {name!r}; this gateway declares no options")
        out: dict[str, Any] = {}
        for f in self.fields:
            if f.field not in user_options:
                out[f.field] = f.check(f.default_value)
                continue
            try:
                out[f.field] = f.check(user_options[f.field])
            except ValueError as exc:
                problems.append(f"{f.field}: {exc}")
        if problems:
            raise OptionsError(problems)
        return out

    def targets(self, normalized: AbcMapping[str, Any]) -> dict[str, Any]:
        """Target name → value for normalized options (a Select's key becomes its value)."""
        return {
            f.target_name: f.target_value(normalized[f.field])
            for f in self.fields
            if f.field in normalized
        }

    async def overrides(self, normalized: AbcMapping[str, Any], user: User) -> dict[str, Any]:
        """Cluster config overrides for normalized options: the handler's answer, or `targets`."""
        if self.handler is None:
            return self.targets(normalized)
        result = self.handler(normalized, user)
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            return {}
        if not isinstance(result, AbcMapping):
            raise TypeError(f"options handler returned {_kind(result)}, expected a mapping")
        return dict(result)

    @classmethod
    def from_config(cls, specs: AbcMapping[str, OptionSpec]) -> Options:
        """Build the form from the `[options.<field>]` tables (``Config.options``).

        Raises OptionsError with one ``options.<field>.<key>: problem`` line per bad declaration.
        """
        problems: list[str] = []
        built: list[Field] = []
        for name, spec in specs.items():
            try:
                built.append(_field_from_spec(name, spec))
            except FieldError as exc:
                problems.append(f"options.{name}.{exc.key}: {exc.message}")
        owners: dict[str, str] = {}
        for f in built:
            if f.target_name in owners:
                problems.append(
                    f"options.{f.field}.target: {f.target_name!r} is already the target of "
                    f"options.{owners[f.target_name]}"
                )
            else:
                owners[f.target_name] = f.field
        if problems:
            raise OptionsError(problems)
        return cls(fields=built)


_NUMERIC_KEYS = ("min", "max")


def _field_from_spec(name: str, spec: OptionSpec) -> Field:
    kind = spec.type
    if kind not in OPTION_TYPES:
        raise FieldError(
            "type", f"unknown type {kind!r}; expected one of {', '.join(OPTION_TYPES)}"
        )
    if not name.isidentifier():
        raise FieldError("field", f"{name!r} is not a valid Python identifier")
    if kind not in ("int", "float"):
        for key in _NUMERIC_KEYS:
            if getattr(spec, key) is not None:
                raise FieldError(key, f"not allowed for type {kind}")
    if kind != "select" and spec.options:
        raise FieldError("options", f"not allowed for type {kind}")
    common: dict[str, Any] = {"field": name, "label": spec.label, "target": spec.target}
    if kind == "int":
        lo, hi = (_integral(key, getattr(spec, key)) for key in _NUMERIC_KEYS)
        default = spec.default
        if default is None:
            default = _clamp(0, lo, hi)
        return Integer(default=default, min=lo, max=hi, **common)
    if kind == "float":
        default = spec.default
        if default is None:
            default = float(_clamp(0, spec.min, spec.max))
        elif _is_number(default):
            default = float(default)
        return Float(default=default, min=spec.min, max=spec.max, **common)
    if kind == "string":
        return String(default="" if spec.default is None else spec.default, **common)
    if kind == "bool":
        return Bool(default=False if spec.default is None else spec.default, **common)
    if kind == "select":
        choices = [_toml_choice(i, entry) for i, entry in enumerate(spec.options)]
        if spec.default is None:
            return Select(options=choices, **common)
        return Select(options=choices, default=spec.default, **common)
    return Mapping(default=spec.default, **common)


def _integral(key: str, value: float | None) -> int | None:
    if value is None:
        return None
    if _is_int(value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise FieldError(key, f"expected an integer for an int option, got {value!r}")


def _clamp(value: float, lo: float | None, hi: float | None) -> float:
    if lo is not None and value < lo:
        value = lo
    if hi is not None and value > hi:
        value = hi
    return value


def _toml_choice(index: int, entry: Any) -> Any:
    """A select choice from TOML: a string key, or a ``{key = "...", value = ...}`` table."""
    if isinstance(entry, AbcMapping):
        if set(entry) != {"key", "value"}:
            raise FieldError(
                "options",
                f"choice {index} must be a string or a table with exactly `key` and `value`, "
                f"got keys {', '.join(sorted(map(str, entry)))}",
            )
        return (entry["key"], entry["value"])
    return entry
