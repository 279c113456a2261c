"""The `gateway://<proxy host>:<port>/<cluster name>` address scheme for distributed.

Owns the connector (TCP to the proxy, TLS with SNI `daskgateway-<cluster name>`, then Dask's TLS
comm) and the backend distributed finds through the `distributed.comm.backends` entry point.
There is no listener: only clients dial gateway addresses.
"""

from __future__ import annotations

from ssl import SSLCertVerificationError, SSLError
from typing import Any
from urllib.parse import urlsplit

from distributed.comm.addressing import unparse_host_port
from distributed.comm.core import FatalCommClosedError
from distributed.comm.registry import Backend, backends
from distributed.comm.tcp import (
    MAX_BUFFER_SIZE,
    TLS,
    TLSConnector,
    convert_stream_closed_error,
    get_stream_address,
)
from distributed.utils import ensure_ip, get_ip
from tornado.iostream import StreamClosedError

__all__ = ["SNI_PREFIX", "GatewayBackend", "GatewayConnector", "parse_gateway_address"]

#: The proxy routes a TLS connection on the server name ``SNI_PREFIX + <cluster name>``.
SNI_PREFIX = "daskgateway-"


def parse_gateway_address(address: str) -> tuple[str, int, str]:
    """``(host, port, cluster name)`` of ``[gateway://]host:port/name``."""
    if not address.startswith("gateway://"):
        address = "gateway://" + address
    parts = urlsplit(address)
    name = parts.path.strip("/")
    if not name:
        raise ValueError(f"gateway address {address!r} names no cluster (expected host:port/name)")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"gateway address {address!r} needs a host and a port")
    return parts.hostname, parts.port, name


class GatewayConnector(TLSConnector):
    """Dials a cluster's scheduler through the gateway's proxy."""

    prefix = "gateway://"

    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> TLS:
        self._check_encryption(address, connection_args)
        host, port, name = parse_gateway_address(address)
        tls_args = self._get_connect_args(**connection_args)
        try:
            stream = await self.client.connect(host, port, max_buffer_size=int(MAX_BUFFER_SIZE))
            stream = await stream.start_tls(
                False, ssl_options=tls_args["ssl_options"], server_hostname=SNI_PREFIX + name
            )
            if stream.closed() and stream.error:
                raise StreamClosedError(stream.error)
        except StreamClosedError as exc:
            convert_stream_closed_error(self, exc)
        except SSLCertVerificationError as exc:
            raise FatalCommClosedError(
                f"the scheduler of cluster {name!r} presented a certificate that does not match "
                "this cluster's credentials"
            ) from exc
        except SSLError as exc:
            raise FatalCommClosedError(
                f"TLS to cluster {name!r} via {host}:{port} failed: {exc}"
            ) from exc
        local_address = "tls://" + get_stream_address(stream)
        peer_address = f"gateway://{unparse_host_port(host, port)}/{name}"
        return TLS(stream, local_address, peer_address, deserialize)


class GatewayBackend(Backend):
    """The `gateway` scheme: connect only, addresses are ``host:port/name``."""

    def get_connector(self) -> GatewayConnector:
        return GatewayConnector()

    def get_listener(
        self, loc: str, handle_comm: Any, deserialize: bool, **connection_args: Any
    ) -> Any:
        raise NotImplementedError("gateway:// addresses can be dialled, not listened on")

    def get_address_host(self, loc: str) -> str:
        return parse_gateway_address(loc)[0]

    def get_address_host_port(self, loc: str) -> tuple[str, int]:
        host, port, _ = parse_gateway_address(loc)
        return host, port

    def resolve_address(self, loc: str) -> str:
        host, port, name = parse_gateway_address(loc)
        return f"{unparse_host_port(ensure_ip(host), port)}/{name}"

    def get_local_address_for(self, loc: str) -> str:
        host, port, name = parse_gateway_address(loc)
        return f"{unparse_host_port(get_ip(ensure_ip(host)), port)}/{name}"


# Registered on import too, so the scheme works when the package runs from a source tree
# without installed metadata (the entry point covers every installed case).
backends.setdefault("gateway", GatewayBackend())
