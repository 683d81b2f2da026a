"""``kvcluster serve``: run the front end, routers and worker pools until a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from kvcluster.common.config import ClusterConfig, load_config
from kvcluster.observability.logs import configure_logging

log = logging.getLogger(__name__)


def serve_forever(config_path: str = "", ray_address: str = "") -> int:
    configure_logging()
    config = load_config(config_path) if config_path else ClusterConfig()
    if ray_address:
        os.environ["RAY_ADDRESS"] = ray_address
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(config))
    return 0


async def _serve(config: ClusterConfig) -> None:
    from kvcluster.runtime.launcher import LocalCluster

    cluster = LocalCluster(config)
    address = await cluster.start()  # also serves /metrics on router.metrics_port (0: free)
    scheme = "https" if cluster.http_server.tls else "http"
    print(f"kvcluster serving gRPC on {address}, "
          f"OpenAI-compatible HTTP on {scheme}://{cluster.http_address}/v1, "
          f"metrics on http://{cluster.metrics_address}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await cluster.stop()
