"""Running the controller as a process: client, signals, and the controller until stopped.

Owns `run_controller` (what `gateway k8s controller` runs) and `make_controller`.
"""

from __future__ import annotations

import asyncio
import signal

from .config import KubeControllerConfig
from .controller import Controller
from .kube import KubeClient, load_api_client


async def make_controller(config: KubeControllerConfig) -> Controller:
    api = await asyncio.to_thread(
        load_api_client, server=config.server, kubeconfig=config.kubeconfig, context=config.context
    )
    # Four informers each hold a thread with their watch; the rest serve requests.
    client = KubeClient(
        api, threads=config.api_threads + 4, qps=config.api_qps, burst=config.api_burst
    )
    return Controller(config=config, client=client)


async def run_controller(config: KubeControllerConfig) -> None:
    """Run until SIGINT/SIGTERM, or until leadership is lost (then exit, as controllers do:
    the replica restarts as a follower)."""
    controller = await make_controller(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await controller.run(stop=stop)
    finally:
        controller.client.close()
