"""Meta-tests on the hookspecs: each is documented the same way, and each is exercised.

A hook nobody implements or tests is a promise nobody checks; this keeps hookspecs.py honest.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from gateway_core import builtin, hookspecs

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent
HOOKS = sorted(
    name
    for name, obj in vars(hookspecs).items()
    if name.startswith("gateway_") and inspect.isfunction(obj)
)


def test_the_hookspecs_are_found() -> None:
    assert "gateway_register_backends" in HOOKS
    assert all(hasattr(getattr(hookspecs, h), "gateway_spec") for h in HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_documents_its_return_and_an_example(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert ":return:" in doc, f"{hook}: the docstring does not say what it returns"
    assert "Example::" in doc, f"{hook}: the docstring has no example"
    example = doc.split("Example::", 1)[1]
    assert f"def {hook}(" in example, f"{hook}: the example does not implement the hook"


@pytest.mark.parametrize("hook", HOOKS)
def test_firstresult_is_said_in_the_docstring(hook: str) -> None:
    spec = getattr(hookspecs, hook)
    doc = inspect.getdoc(spec) or ""
    assert spec.gateway_spec["firstresult"] == ("firstresult" in doc), (
        f"{hook}: firstresult in the decorator and in the docstring must agree"
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_implemented_by_core_or_exercised_by_a_test(hook: str) -> None:
    if hasattr(builtin, hook):
        return
    this_file = Path(__file__).resolve()
    users = [
        path.name
        for path in TESTS.rglob("test_*.py")
        if path.resolve() != this_file and hook in path.read_text()
    ]
    assert users, f"{hook} is neither implemented by gateway_core.builtin nor used in any test"
