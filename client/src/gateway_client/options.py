"""The cluster options a user may set, as the gateway describes them, with validation.

Owns `Options` (an editable mapping built from GET /api/v1/options field specs) and the field
types (`int`, `float`, `string`, `bool`, `select`, `mapping`), their checks and their widgets.
"""

from __future__ import annotations

import copy
import html
import json
import weakref
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from keyword import iskeyword
from typing import Any, ClassVar

import yaml

__all__ = ["Field", "Options"]


class Field:
    """One option: its name, label, current value and the check every new value passes."""

    type_name: ClassVar[str] = "any"

    def __init__(self, *, field: str, default: Any, label: str | None = None) -> None:
        self.field = field
        self.label = label or field
        self._widgets: weakref.WeakSet[Any] = weakref.WeakSet()
        try:
            self.value = self.validate(default)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the gateway's default for {field} is invalid: {exc}") from None
        self.default = self.value

    def validate(self, value: Any) -> Any:
        """``value`` as stored, or TypeError/ValueError naming the field and what it accepts."""
        return value

    def constraint(self) -> str:
        """What the field accepts, in words, for listings."""
        return self.type_name

    def clone(self) -> Field:
        """An independent copy: same spec and value, no widgets bound."""
        new = copy.copy(self)
        new._widgets = weakref.WeakSet()
        new.value = copy.deepcopy(self.value)
        return new

    def set(self, value: Any) -> None:
        self.value = self.validate(value)
        for widget in list(self._widgets):
            widget.value = self._to_widget(self.value)

    # -- widgets ------------------------------------------------------------------------------

    def _to_widget(self, value: Any) -> Any:
        return value

    def _from_widget(self, value: Any) -> Any:
        return value

    def _make_input(self) -> Any:
        import ipywidgets

        return ipywidgets.Text(value=json.dumps(self.value), continuous_update=False)

    def widgets(self) -> tuple[Any, Any, Any]:
        """A label, an input bound both ways to this field, and a status line for errors."""
        import ipywidgets

        label = ipywidgets.HTML(f"<b>{html.escape(self.label)}:</b>")
        status = ipywidgets.HTML("")
        control = self._make_input()

        def on_change(change: Mapping[str, Any]) -> None:
            try:
                self.set(self._from_widget(change["new"]))
            except (TypeError, ValueError, yaml.YAMLError) as exc:
                status.value = f"<span style='color: #c00'>{html.escape(str(exc))}</span>"
            else:
                status.value = ""

        control.observe(on_change, names="value")
        self._widgets.add(control)
        return label, control, status


class AnyField(Field):
    """A field of a type this client does not know: sent as set, checked by the server."""

    def _from_widget(self, value: Any) -> Any:
        return json.loads(value)

    def _to_widget(self, value: Any) -> Any:
        return json.dumps(value)


class String(Field):
    type_name = "string"

    def validate(self, value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{self.field} must be a string, got {value!r}")
        return value

    def _make_input(self) -> Any:
        import ipywidgets

        return ipywidgets.Text(value=self.value, continuous_update=False)


class Bool(Field):
    type_name = "bool"

    def validate(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"{self.field} must be True or False, got {value!r}")
        return value

    def _make_input(self) -> Any:
        import ipywidgets

        return ipywidgets.Checkbox(value=self.value, indent=False)


class Number(Field):
    """A number with optional inclusive bounds."""

    python_type: ClassVar[type] = float

    def __init__(
        self,
        *,
        field: str,
        default: Any,
        label: str | None = None,
        min: float | None = None,
        max: float | None = None,
    ) -> None:
        self.field = field
        self.min = None if min is None else self._coerce(min)
        self.max = None if max is None else self._coerce(max)
        super().__init__(field=field, default=default, label=label)

    def _coerce(self, value: Any) -> Any:
        raise NotImplementedError

    def constraint(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.type_name} from {self.min} to {self.max}"
        if self.min is not None:
            return f"{self.type_name} >= {self.min}"
        if self.max is not None:
            return f"{self.type_name} <= {self.max}"
        return self.type_name

    def validate(self, value: Any) -> Any:
        number = self._coerce(value)
        too_low = self.min is not None and number < self.min
        too_high = self.max is not None and number > self.max
        if too_low or too_high:
            if self.min is not None and self.max is not None:
                bounds = f"between {self.min} and {self.max}"
            elif self.min is not None:
                bounds = f"at least {self.min}"
            else:
                bounds = f"at most {self.max}"
            raise ValueError(f"{self.field} must be {bounds}, got {value!r}")
        return number


class Integer(Number):
    type_name = "int"

    def _coerce(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{self.field} must be an integer, got {value!r}")
        return value

    def _make_input(self) -> Any:
        import ipywidgets

        if self.min is None and self.max is None:
            return ipywidgets.IntText(value=self.value)
        return ipywidgets.BoundedIntText(
            value=self.value,
            min=-(2**63) if self.min is None else self.min,
            max=2**63 - 1 if self.max is None else self.max,
        )


class Float(Number):
    type_name = "float"

    def _coerce(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{self.field} must be a number, got {value!r}")
        return float(value)

    def _make_input(self) -> Any:
        import ipywidgets

        if self.min is None and self.max is None:
            return ipywidgets.FloatText(value=self.value)
        return ipywidgets.BoundedFloatText(
            value=self.value,
            min=-1e308 if self.min is None else self.min,
            max=1e308 if self.max is None else self.max,
        )


class Select(Field):
    type_name = "select"

    def __init__(
        self,
        *,
        field: str,
        default: Any,
        label: str | None = None,
        options: Iterable[str] = (),
    ) -> None:
        self.field = field
        self.options = tuple(options)
        if not self.options:
            raise ValueError(f"the gateway offers no choices for {field}")
        super().__init__(field=field, default=default, label=label)

    def constraint(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def validate(self, value: Any) -> str:
        if value not in self.options:
            raise ValueError(f"{self.field} must be {self.constraint()}, got {value!r}")
        return value

    def _make_input(self) -> Any:
        import ipywidgets

        return ipywidgets.Dropdown(value=self.value, options=self.options)


class MappingField(Field):
    type_name = "mapping"

    def validate(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise TypeError(f"{self.field} must be a mapping (dict), got {type(value).__name__}")
        value = dict(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.field} must be JSON-serializable: {exc}") from None
        return value

    def _to_widget(self, value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=False) if value else ""

    def _from_widget(self, value: Any) -> Any:
        text = value.strip()
        return yaml.safe_load(text) if text else {}

    def _make_input(self) -> Any:
        import ipywidgets

        return ipywidgets.Textarea(
            value=self._to_widget(self.value),
            placeholder="YAML or JSON, e.g. {KEY: value}",
            continuous_update=False,
        )


FIELD_TYPES: dict[str, type[Field]] = {
    "int": Integer,
    "float": Float,
    "string": String,
    "bool": Bool,
    "select": Select,
    "mapping": MappingField,
}


def field_from_spec(spec: Mapping[str, Any]) -> Field:
    """A Field from one `<field spec>` of GET /api/v1/options (PROTOCOL.md)."""
    type_spec = dict(spec.get("spec") or {})
    kind = type_spec.pop("type", "any")
    cls = FIELD_TYPES.get(kind, AnyField)
    if cls is AnyField:
        type_spec = {}
    return cls(
        field=spec["field"], default=spec.get("default"), label=spec.get("label"), **type_spec
    )


class Options(MutableMapping[str, Any]):
    """The options for a new cluster, editable by attribute or key, checked on every set.

    Built by ``Gateway.cluster_options()``; pass it to ``new_cluster(cluster_options=...)``.
    In Jupyter it shows as a form (with ``ipywidgets``) or an HTML table.
    """

    _fields: dict[str, Field]

    def __init__(self, fields: Iterable[Field] = ()) -> None:
        object.__setattr__(self, "_fields", {f.field: f for f in fields})

    @classmethod
    def from_spec(cls, spec: Iterable[Mapping[str, Any]]) -> Options:
        return cls(field_from_spec(s) for s in spec)

    # -- mapping ------------------------------------------------------------------------------

    def _field(self, key: str, error: type[Exception]) -> Field:
        try:
            return self._fields[key]
        except KeyError:
            available = ", ".join(self._fields) or "none"
            raise error(f"no option {key!r}; available options: {available}") from None

    def __getitem__(self, key: str) -> Any:
        return self._field(key, KeyError).value

    def __setitem__(self, key: str, value: Any) -> None:
        self._field(key, KeyError).set(value)

    def __delitem__(self, key: str) -> None:
        raise TypeError("options cannot be removed; set a value instead")

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):  # internals (and copy/pickle probes), never option names
            raise AttributeError(key)
        return self._field(key, AttributeError).value

    def __setattr__(self, key: str, value: Any) -> None:
        self._field(key, AttributeError).set(value)

    def __delattr__(self, key: str) -> None:
        raise TypeError("options cannot be removed; set a value instead")

    def __dir__(self) -> list[str]:
        names = set(super().__dir__())
        names.update(k for k in self._fields if k.isidentifier() and not iskeyword(k))
        return sorted(names)

    def __copy__(self) -> Options:
        return Options(f.clone() for f in self._fields.values())

    def __deepcopy__(self, memo: dict[int, Any]) -> Options:
        return self.__copy__()

    def field(self, key: str) -> Field:
        """The Field behind ``key`` (its label, default, bounds)."""
        return self._field(key, KeyError)

    def reset(self) -> None:
        """Set every option back to the gateway's default."""
        for f in self._fields.values():
            f.set(f.default)

    # -- display ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={f.value!r}" for k, f in self._fields.items())
        return f"Options<{body}>"

    def _repr_html_(self) -> str:
        cell = "<td style='text-align:left'>{}</td>"
        rows = "".join(
            "<tr>"
            + cell.format(html.escape(f.label))
            + cell.format(f"<code>{html.escape(repr(f.value))}</code>")
            + cell.format(html.escape(f.constraint()))
            + "</tr>"
            for f in self._fields.values()
        )
        return (
            "<div><b>Cluster options</b><table>"
            "<tr><th style='text-align:left'>Option</th><th style='text-align:left'>Value</th>"
            f"<th style='text-align:left'>Allowed</th></tr>{rows}</table></div>"
        )

    def _widget(self) -> Any:
        """An ipywidgets form bound to these options, or None without ipywidgets."""
        cached = self.__dict__.get("_cached_widget")
        if cached is not None:
            return cached
        try:
            import ipywidgets
        except ImportError:
            return None
        cells = [w for f in self._fields.values() for w in f.widgets()]
        form = ipywidgets.GridBox(
            children=cells,
            layout=ipywidgets.Layout(grid_template_columns="auto auto auto", grid_gap="4px 8px"),
        )
        box = ipywidgets.VBox([ipywidgets.HTML("<h3>Cluster options</h3>"), form])
        object.__setattr__(self, "_cached_widget", box)
        return box

    def _ipython_display_(self, **kwargs: Any) -> None:
        from IPython.display import display

        widget = self._widget()
        if widget is not None:
            display(widget, **kwargs)
        else:
            display({"text/plain": repr(self), "text/html": self._repr_html_()}, raw=True)
