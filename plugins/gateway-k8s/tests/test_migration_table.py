"""README.md's table "Migrating from dask-gateway's Kubernetes backend": every Kubernetes option
of the original server (tests/data/original_kube_options.txt, from its configuration reference)
has a row, and every name in the "ours" column exists in our code, CLI or chart.

Unit tests: files and imports only.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import attrs
import click
import pytest
import yaml

from gateway_core.cli import make_cli
from gateway_core.config import Config, GatewayConfig, ProxyConfig
from gateway_k8s import hooks
from gateway_k8s.config import KubeBackendConfig, KubeClusterConfig

pytestmark = pytest.mark.unit
PLUGIN = Path(__file__).resolve().parent.parent
README = PLUGIN / "README.md"
ORIGINALS = PLUGIN / "tests" / "data" / "original_kube_options.txt"
VALUES = PLUGIN / "chart" / "values.yaml"
SECTION = "## Migrating from dask-gateway's Kubernetes backend"
ORIGINAL_NAME = re.compile(r"^c\.(KubeClusterConfig|KubeBackend|KubeController)\.[a-z0-9_]+$")
CLASSES = ("KubeClusterConfig", "KubeBackend", "KubeController")
# What a row without an equivalent must say first: why there is none.
NONE_REASONS = ("Gone", "Not built", "Not settable yet")


def originals() -> list[str]:
    return [
        line.strip()
        for line in ORIGINALS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def table_rows(text: str) -> list[tuple[str, str, str]]:
    """(original, ours, notes) of each row of the migration section's table."""
    assert text.count(SECTION) == 1, f"README.md has no single section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `c."):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"not three cells: {line}"
        original, ours, notes = cells
        assert original.startswith("`") and original.endswith("`"), line
        rows.append((original.strip("`"), ours, notes))
    return rows


def controller_command() -> click.Command:
    """`gateway k8s controller` as the plugin registers it."""
    group = click.Group("gateway")
    hooks.gateway_register_commands(cli=group)
    k8s = group.commands["k8s"]
    assert isinstance(k8s, click.Group)
    return k8s.commands["controller"]


def field_names(cls: type) -> set[str]:
    return {f.name for f in attrs.fields(cls)}


def values_has(values: Any, dotted: str) -> bool:
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def cli_has(words: list[str]) -> bool:
    command: click.Command = make_cli()
    for word in words:
        if not isinstance(command, click.Group) or word not in command.commands:
            return False
        command = command.commands[word]
    return True


def problem_with(name: str) -> str | None:
    """Why ``name`` (a code span of the "ours" column) names nothing of ours; None if it does."""
    sections: dict[str, set[str]] = {
        "cluster": field_names(KubeClusterConfig),
        "backend.kubernetes": field_names(KubeBackendConfig),
        "gateway": field_names(GatewayConfig),
        "proxy": field_names(ProxyConfig),
    }
    controller = controller_command()
    if match := re.fullmatch(r"\[([a-z.]+)\] ([a-z0-9_]+)", name):
        section, key = match.groups()
        if section not in sections:
            return f"{name}: no section [{section}] is known to this test"
        return None if key in sections[section] else f"{name}: [{section}] has no key {key!r}"
    if name == "[options.<field>]":
        return None if "options" in field_names(Config) else f"{name}: no [options] tables"
    if name.startswith("--"):
        flags = {opt for p in controller.params for opt in p.opts}
        return None if name in flags else f"{name}: gateway k8s controller has no such flag"
    if re.fullmatch(r"[A-Z][A-Z0-9_]+", name):
        envvars = {p.envvar for p in controller.params if isinstance(p, click.Option)}
        return None if name in envvars else f"{name}: the controller reads no such variable"
    if name.startswith(".Values."):
        values = yaml.safe_load(VALUES.read_text())
        key = name.removeprefix(".Values.")
        return None if values_has(values, key) else f"{name}: chart/values.yaml has no {key}"
    if name.startswith("gateway_k8s."):
        module, _, attr = name.rpartition(".")
        found = hasattr(importlib.import_module(module), attr)
        return None if found else f"{name}: no such object"
    if name.startswith("gateway "):
        return None if cli_has(name.split()[1:]) else f"{name}: no such command"
    return f"{name}: not a form this test knows (section key, flag, variable, chart value)"


def ours_problems(ours: str, notes: str) -> list[str]:
    """What is wrong with one row's "ours" and notes cells."""
    if not notes:
        return ["the notes cell is empty"]
    if ours == "none":
        if notes.startswith(NONE_REASONS):
            return []
        return [f"no equivalent, and the notes do not start with one of {NONE_REASONS}"]
    names = re.findall(r"`([^`]+)`", ours)
    rest = re.sub(r"`[^`]+`", "", ours).replace(",", "").strip()
    problems = [f"text outside names in the ours cell: {rest!r}"] if rest or not names else []
    return problems + [p for p in map(problem_with, names) if p]


def test_the_original_options_are_the_references_kubernetes_options() -> None:
    names = originals()
    assert len(names) == len(set(names)), "a name is listed twice"
    assert all(ORIGINAL_NAME.match(n) for n in names), [
        n for n in names if not ORIGINAL_NAME.match(n)
    ]
    per_class = {cls: sum(n.split(".")[1] == cls for n in names) for cls in CLASSES}
    # The reference's own counts: 29 cluster options (inherited ones included), 8 of the
    # backend, 24 of the controller.
    assert per_class == {"KubeClusterConfig": 29, "KubeBackend": 8, "KubeController": 24}


def test_every_original_option_has_exactly_one_row() -> None:
    listed = [original for original, _, _ in table_rows(README.read_text())]
    missing = sorted(set(originals()) - set(listed))
    assert not missing, f"original options missing from README.md's migration table: {missing}"
    unknown = sorted(set(listed) - set(originals()))
    assert not unknown, f"rows for options the original does not have: {unknown}"
    twice = sorted({n for n in listed if listed.count(n) > 1})
    assert not twice, f"options with more than one row: {twice}"


def test_every_name_in_the_ours_column_exists() -> None:
    problems = [
        f"{original}: {problem}"
        for original, ours, notes in table_rows(README.read_text())
        for problem in ours_problems(ours, notes)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("ours", "notes", "complaint"),
    [
        ("`[cluster] no_such_option`", "Same.", "[cluster] has no key 'no_such_option'"),
        ("`[backend.kubernetes] image`", "Same.", "[backend.kubernetes] has no key 'image'"),
        ("`--no-such-flag`", "Same.", "has no such flag"),
        ("`NO_SUCH_VARIABLE`", "Same.", "reads no such variable"),
        ("`.Values.gateway.nope`", "Same.", "values.yaml has no gateway.nope"),
        ("`gateway_k8s.config.NoSuchClass`", "Same.", "no such object"),
        ("`gateway config nope`", "Same.", "no such command"),
        ("`[cluster] image` or so", "Same.", "text outside names"),
        ("none", "Maybe later.", "do not start with"),
        ("`[cluster] image`", "", "notes cell is empty"),
    ],
)
def test_the_checks_refuse_what_does_not_exist(ours: str, notes: str, complaint: str) -> None:
    problems = ours_problems(ours, notes)
    assert any(complaint in p for p in problems), problems


def test_the_table_parser_sees_a_missing_row() -> None:
    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `c.KubeBackend.api_url`"))
    rows = table_rows(text.replace(row + "\n", ""))
    assert "c.KubeBackend.api_url" not in [original for original, _, _ in rows]
    assert len(rows) == len(originals()) - 1
