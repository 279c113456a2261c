"""The DaskCluster objects of the original dask-gateway for the Kubernetes benchmark.
Owns nothing but printing them: run with the original's venv, JSON list on stdout.
"""

# k8s_bench.py runs this with the Python of the venv that holds `dask-gateway-server[kubernetes]`
# (never our dev venv), so the objects come from the original's own code: its `KubeBackend`'s
# `make_cluster_object` with a default `KubeClusterConfig` (image and namespace from the
# arguments), as `KubeBackend.start_cluster` makes them; `spec.replicas` is then set to the
# wanted workers, as the backend's heartbeat handler would patch it.
#
#   python k8s_original_objects.py COUNT NAMESPACE INSTANCE IMAGE REPLICAS

from __future__ import annotations

import json
import sys

from dask_gateway_server.backends.kubernetes.backend import KubeBackend, KubeClusterConfig


def main() -> None:
    count, namespace, instance, image, replicas = sys.argv[1:6]
    backend = KubeBackend(gateway_instance=instance)
    config = KubeClusterConfig(namespace=namespace, image=image)
    objects = []
    for _ in range(int(count)):
        obj = backend.make_cluster_object("bench-user", {}, config)
        obj["spec"]["replicas"] = int(replicas)
        objects.append(obj)
    json.dump(objects, sys.stdout)


if __name__ == "__main__":
    main()
