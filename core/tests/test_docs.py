"""Meta-tests on the documentation: every hook has its own page naming its parameters.

Keeps docs/hooks/ in step with gateway_core.hookspecs, as datasette does for its hooks.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from gateway_core import hookspecs

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[2] / "docs"
HOOKS = sorted(
    name
    for name, obj in vars(hookspecs).items()
    if name.startswith("gateway_") and inspect.isfunction(obj)
)


def test_hooks_exist() -> None:
    assert len(HOOKS) >= 7


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_page_naming_its_parameters(hook: str) -> None:
    page = DOCS / "hooks" / f"{hook}.md"
    assert page.exists(), f"docs/hooks/{hook}.md is missing"
    text = page.read_text()
    for param in inspect.signature(getattr(hookspecs, hook)).parameters:
        assert f"`{param}`" in text or f"{param}," in text or f"{param})" in text, (
            f"{page.name} does not mention parameter {param!r}"
        )
    assert "```python" in text, f"{page.name} has no example"
    firstresult = getattr(hookspecs, hook).gateway_spec["firstresult"]
    assert ("firstresult" in text) == firstresult


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_the_index(hook: str) -> None:
    assert f"hooks/{hook}.md" in (DOCS / "hooks.md").read_text()


CONFIG_SECTIONS = {
    "[gateway]": "GatewayConfig",
    "[proxy]": "ProxyConfig",
    "[metrics]": "MetricsConfig",
    "[cluster]": "ClusterConfig",
    "[backend.<name>]": "ProcessBackendConfig",
    "[auth.<name>]": "AuthConfig",
    "[quotas]": "Quota",
}


def test_every_config_attribute_has_its_own_docstring() -> None:
    """Each setting of the documented config sections is followed by the string documenting it,
    and by one only: a second string in a row is a docstring that slid off its setting."""
    import ast

    from gateway_core import config

    tree = ast.parse(Path(config.__file__).read_text())
    problems = []
    seen = set()
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name not in CONFIG_SECTIONS.values():
            continue
        seen.add(node.name)
        body = node.body
        for i, stmt in enumerate(body):
            following = body[i + 1] if i + 1 < len(body) else None
            documented = (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            )
            if isinstance(stmt, ast.AnnAssign) and not documented:
                problems.append(f"{node.name}.{ast.unparse(stmt.target)}: no docstring")
            if i > 0 and _is_string(stmt) and _is_string(body[i - 1]):
                problems.append(f"{node.name}: line {stmt.lineno} is a second docstring in a row")
    assert seen == set(CONFIG_SECTIONS.values())
    assert problems == []


def _is_string(stmt: object) -> bool:
    import ast

    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


@pytest.mark.parametrize("section", CONFIG_SECTIONS)
def test_every_config_key_is_documented(section: str) -> None:
    import attrs

    from gateway_core import config

    text = (DOCS / "configuration.md").read_text()
    start = text.index(f"## `{section}`")
    end = text.find("\n## ", start + 1)
    block = text[start : end if end > 0 else None]
    cls = getattr(config, CONFIG_SECTIONS[section])
    for f in attrs.fields(cls):
        assert f"| `{f.name}` |" in block, f"{section} {f.name} missing from configuration.md"


def test_every_driver_kit_helper_is_in_the_toolbox_section() -> None:
    from gateway_core.backends import kit

    page = (DOCS / "writing-a-backend.md").read_text()
    start = page.index("## The driver kit (toolbox)")
    section = page[start : page.index("\n## ", start + 1)]
    missing = [name for name in kit.__all__ if f"`{name}" not in section]
    assert missing == [], f"docs/writing-a-backend.md does not list {missing}"
