"""``host:port`` strings: this package's one parser and formatter of listen and connect addresses.

Owns `split_address` and `join_address`, the only ones in the tree: gateway-core depends on
the proxy and uses these too (the proxy never imports core).
"""

from __future__ import annotations


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"``, ``":port"``, ``"[::1]:port"`` → (host, port); an empty host means
    every interface, port 0 any free port.

    Raises ValueError naming the address and what is wrong with it.
    """
    host, sep, port = address.rpartition(":")
    if not sep:
        raise ValueError(f"address {address!r}: expected host:port")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"address {address!r}: port must be a number")
    number = int(port)
    if number > 65535:
        raise ValueError(f"address {address!r}: port must be at most 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, number


def join_address(host: str, port: int) -> str:
    """(host, port) → ``"host:port"``, an IPv6 host in brackets (``"[::1]:8000"``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
