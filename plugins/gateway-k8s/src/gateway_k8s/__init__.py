"""gateway-k8s: the Kubernetes backend of the gateway (work in progress, issue 12).

Owns the package version; the DaskCluster custom resource definition lives in `crd`.
"""

__version__ = "0.1.0"
