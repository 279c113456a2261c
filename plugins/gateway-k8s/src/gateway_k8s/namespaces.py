"""Which namespaces the clusters of a Kubernetes gateway run in: a cluster's `namespace`
template rendered for its user and checked, and what the informers watch.

Owns `NamespacePolicy` (the backend's namespace, the others allowed, the watch scope),
`template_problems` (the check of a template in `[cluster]` or from user options) and
`render` (a template for one user).
"""

from __future__ import annotations

import re
import string
from fnmatch import fnmatchcase

from attrs import define

from gateway_core.errors import InvalidRequest

PLACEHOLDER = "username"
"""The one field a template may name: ``{username}``."""

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_PATTERN = re.compile(r"^[a-z0-9*]([-a-z0-9*]*[a-z0-9*])?$")
_NOT_LABEL = re.compile(r"[^a-z0-9]+")
MAX_LABEL = 63


def is_label(value: str) -> bool:
    """A DNS-1123 label, what a namespace name must be."""
    return len(value) <= MAX_LABEL and bool(_LABEL.match(value))


def username_label(username: str) -> str:
    """``username`` as it goes into a namespace: lower case, every run of characters other
    than a-z and 0-9 one ``-``, none at either end (``Alice.Smith@ex`` -> ``alice-smith-ex``).
    Two user names may give the same text; the gateway still checks each cluster's owner."""
    return _NOT_LABEL.sub("-", username.lower()).strip("-")


def _fields(template: str) -> list[str]:
    """The fields ``template`` names; ValueError on a broken or unknown one."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if name != PLACEHOLDER or spec or conversion:
            shown = (
                "{"
                + name
                + ("!" + conversion if conversion else "")
                + (":" + spec if spec else "")
                + "}"
            )
            raise ValueError(f"{shown} is not a field of a namespace template (only {{username}})")
        names.append(name)
    return names


def template_problems(key: str, template: str) -> list[str]:
    """What is wrong with ``template`` (a namespace, or one naming ``{username}``); empty
    means the backend's namespace and is fine."""
    if not template:
        return []
    try:
        fields = _fields(template)
    except ValueError as exc:
        return [f"{key}: {template!r}: {exc}"]
    sample = template.replace("{username}", "u") if fields else template
    if not is_label(sample):
        what = "with {username} replaced, " if fields else ""
        return [
            f"{key}: {template!r} is not a namespace name {what}(a DNS-1123 label: at most "
            "63 lower-case letters, digits and '-', starting and ending with a letter or digit)"
        ]
    return []


def render(template: str, username: str) -> str:
    """The namespace ``template`` names for ``username``; `InvalidRequest` naming the template,
    the user and the result when that is not a DNS-1123 label."""
    problems = template_problems("namespace", template)
    if problems:
        raise InvalidRequest("; ".join(problems))
    label = username_label(username)
    if "{username}" in template and not label:
        raise InvalidRequest(
            f"namespace: {template!r} for user {username!r}: the user name has no letter or "
            "digit to put in a namespace name"
        )
    namespace = template.replace("{username}", label)
    if not is_label(namespace):
        raise InvalidRequest(
            f"namespace: {template!r} for user {username!r} gives {namespace!r}, which is not a "
            "namespace name (a DNS-1123 label: at most 63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit)"
        )
    return namespace


def pattern_problems(key: str, patterns: list[str]) -> list[str]:
    problems = []
    for i, pattern in enumerate(patterns):
        if pattern == "*" or not (len(pattern) <= MAX_LABEL and _PATTERN.match(pattern)):
            problems.append(
                f"{key}[{i}]: {pattern!r} is not a namespace name or pattern (lower-case "
                "letters, digits, '-' and '*' for any text, e.g. 'dask-*'; not '*' alone)"
            )
    return problems


@define(kw_only=True, frozen=True)
class NamespacePolicy:
    """The backend's ``default`` namespace, and ``allowed``: more namespaces (names or
    shell patterns) clusters may run in. Without ``allowed`` everything is in ``default`` and
    only it is watched; with them, the informers watch all namespaces (one watch per kind,
    whatever the number of users) and keep only objects in allowed namespaces."""

    default: str
    allowed: tuple[str, ...] = ()

    @property
    def watch_namespace(self) -> str:
        """What an informer lists and watches: the default namespace, or "" for all."""
        return "" if self.allowed else self.default

    def allows(self, namespace: str) -> bool:
        return namespace == self.default or any(fnmatchcase(namespace, p) for p in self.allowed)

    def for_cluster(self, template: str, username: str) -> str:
        """The namespace of ``username``'s new cluster: ``template`` rendered (empty: the
        default); `InvalidRequest` naming it when it is not a namespace name or not allowed."""
        namespace = render(template, username) if template else self.default
        if not self.allows(namespace):
            allowed = ", ".join(repr(n) for n in (self.default, *self.allowed))
            shown = f"{namespace!r}" + (f" (from {template!r})" if template != namespace else "")
            raise InvalidRequest(
                f"namespace: {shown} is not a namespace this gateway may run clusters in "
                f"(allowed: {allowed}; `[backend.kubernetes] namespace` and `namespaces`)"
            )
        return namespace
