"""Unit tests of the routing tables: segment-wise longest prefix, static routes, target parsing.

Owns checks of `RouteTable`, `Route.from_json`, `HttpTarget.parse`, `sni_target` and
`ProxySettings` validation, with no sockets involved.
"""

from __future__ import annotations

import socket

import pytest

from gateway_proxy import ProxySettings, Route
from gateway_proxy.addresses import join_address, split_address
from gateway_proxy.table import HttpTarget, RouteTable, normalize_prefix, sni_target

pytestmark = pytest.mark.unit


def path(key: str, target: str) -> Route:
    return Route(kind="PATH", key=key, target=target)


def test_match_is_by_whole_segments_and_longest_first() -> None:
    table = RouteTable()
    table.put(path("/clusters/a", "http://10.0.0.1:1"))
    table.put(path("/clusters/a/b/", "http://10.0.0.2:2/base/"))
    assert table.match_path("/clusters/abc") is None
    target, rest = table.match_path("/clusters/a/b/c?x") or (None, "")
    assert target is not None and target.port == 2 and rest == "/base/c?x"
    target, rest = table.match_path("/clusters/a/bb") or (None, "")
    assert target is not None and target.port == 1 and rest == "/bb"
    assert table.match_path("/clusters/a")[1] == "/"  # type: ignore[index]
    assert table.match_path("/clusters/a/")[1] == "/"  # type: ignore[index]
    assert table.match_path("/") is None


def test_root_route_catches_everything_else() -> None:
    table = RouteTable()
    table.put(path("/", "http://api:80"))
    assert table.match_path("/")[1] == "/"  # type: ignore[index]
    assert table.match_path("/api/v1/x")[1] == "/api/v1/x"  # type: ignore[index]


def test_static_route_sits_under_the_dynamic_ones() -> None:
    table = RouteTable()
    table.set_static_path("/gw/", "http://api:1")
    table.put(path("/gw", "http://other:2"))
    assert table.match_path("/gw/x")[0].host == "other"  # type: ignore[index]
    table.delete(path("/gw", ""))
    assert table.match_path("/gw/x")[0].host == "api"  # type: ignore[index]
    table.replace([path("/gw/clusters/c", "http://c:3")])
    assert table.match_path("/gw/x")[0].host == "api"  # type: ignore[index]
    assert table.match_path("/gw/clusters/c/s")[0].host == "c"  # type: ignore[index]


def test_replace_swaps_everything_and_reports_refusals() -> None:
    table = RouteTable()
    table.put(Route(kind="SNI", key="old", target="tls://10.0.0.1:1"))
    refused = table.replace(
        [
            Route(kind="SNI", key="new", target="tls://10.0.0.2:2"),
            Route(kind="SNI", key="bad", target="nowhere"),
            path("/p", "ftp://x"),
        ]
    )
    assert [r.key for r, _ in refused] == ["bad", "/p"]
    assert table.lookup_sni("daskgateway-old") is None
    assert table.lookup_sni("daskgateway-new") == ("10.0.0.2", 2, socket.AF_INET)
    assert table.lookup_sni("new") is None  # clients always send the prefix


def test_sni_targets() -> None:
    assert sni_target("tls://127.0.0.1:8786") == ("127.0.0.1", 8786, socket.AF_INET)
    assert sni_target("[::1]:9") == ("::1", 9, socket.AF_INET6)
    assert sni_target("tls://scheduler.ns.svc:8786") == ("scheduler.ns.svc", 8786, 0)
    for bad in ("tls://host", "http://h:1", "tls://h:0", "tls://h:x", ":8786"):
        with pytest.raises(ValueError):
            sni_target(bad)


def test_http_targets() -> None:
    target = HttpTarget.parse("https://[::1]:8443/base/")
    assert (target.host, target.port, target.tls, target.path) == ("::1", 8443, True, "/base")
    assert target.host_header == b"[::1]:8443"
    assert HttpTarget.parse("http://h").port == 80
    with pytest.raises(ValueError):
        HttpTarget.parse("tls://h:1")


def test_routes_from_the_feed_json() -> None:
    assert Route.from_json({"kind": "SNI", "sni": "c", "target": "tls://h:1"}) == Route(
        kind="SNI", key="c", target="tls://h:1"
    )
    assert Route.from_json({"kind": "PATH", "path": "/p"}).target == ""  # a DELETE's route
    for bad in ({"kind": "X"}, {"kind": "SNI"}, {"kind": "PATH", "path": ""}):
        with pytest.raises(ValueError):
            Route.from_json(bad)


def test_settings_and_addresses() -> None:
    assert normalize_prefix("gateway/") == "/gateway"
    assert normalize_prefix("/") == ""
    assert ProxySettings(prefix="gw").prefix == "/gw"
    assert ProxySettings(address=":8000").shared_port
    assert ProxySettings(address="127.0.0.1:0", tcp_address="127.0.0.1:0").shared_port is False
    assert ProxySettings(address=":8000", tcp_address=":8000").shared_port
    assert split_address("[::1]:80") == ("::1", 80)
    assert split_address(":8000") == ("", 8000)
    assert join_address("::1", 80) == "[::1]:80" and join_address("h", 1) == "h:1"
    for bad, why in (("nowhere", "expected host:port"), ("h:x", "port must be a number")):
        with pytest.raises(ValueError, match=f"address '{bad}': {why}"):
            split_address(bad)
    with pytest.raises(ValueError, match="at most 65535"):
        split_address("h:65536")
    with pytest.raises(ValueError):
        ProxySettings(tls_cert="cert.pem")
    with pytest.raises(ValueError):
        ProxySettings(address="nowhere")


@pytest.mark.parametrize(
    ("target", "location", "public"),
    [
        # distributed answers /clusters/abc with "301 Location: /status"
        ("http://10.0.0.1:8787", b"/status", b"/clusters/abc/status"),
        ("http://10.0.0.1:8787", b"/", b"/clusters/abc/"),
        ("http://10.0.0.1:8787", b"/x?y=1", b"/clusters/abc/x?y=1"),
        ("http://10.0.0.1:8787", b"http://10.0.0.1:8787/status", b"/clusters/abc/status"),
        ("http://10.0.0.1:8787", b"http://10.0.0.1:8787", b"/clusters/abc/"),
        # a target with its own path: only paths under it map back
        ("http://10.0.0.1:1/base", b"/base/page", b"/clusters/abc/page"),
        ("http://10.0.0.1:1/base", b"/base", b"/clusters/abc/"),
        ("http://10.0.0.1:1/base", b"/basement", b"/basement"),
        ("http://10.0.0.1:1/base", b"/other", b"/other"),
        # left alone: relative references, other hosts, scheme-relative, a longer port
        ("http://10.0.0.1:8787", b"status", b"status"),
        ("http://10.0.0.1:8787", b"https://example.org/x", b"https://example.org/x"),
        ("http://10.0.0.1:8787", b"//example.org/x", b"//example.org/x"),
        ("http://10.0.0.1:8787", b"http://10.0.0.1:87870/x", b"http://10.0.0.1:87870/x"),
    ],
)
def test_redirects_from_a_target_stay_inside_its_route(
    target: str, location: bytes, public: bytes
) -> None:
    table = RouteTable()
    table.put(path("/clusters/abc", target))
    found = table.match_path("/clusters/abc/anything")
    assert found is not None
    assert found[0].public_location(location) == public


def test_redirects_from_the_root_route_are_untouched() -> None:
    table = RouteTable()
    table.set_static_path("/", "http://127.0.0.1:8081")
    found = table.match_path("/api/v1/clusters")
    assert found is not None
    assert found[0].public_location(b"/api/v1/clusters/") == b"/api/v1/clusters/"
