"""A fake Kubernetes API server and a simulated kubelet for the gateway-k8s tests (not shipped).

`FakeKube` serves core/v1, leases and custom resources from CRDs; see README.md for the list.
"""

from .server import FakeKube
from .store import ApiError, Kind, Store

__all__ = ["ApiError", "FakeKube", "Kind", "Store"]
