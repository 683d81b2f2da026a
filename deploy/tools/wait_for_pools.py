#!/usr/bin/env python3
"""Wait until the Ray cluster offers every node the cluster file's pools need.

`kvcluster serve` places each pool's actors with the custom resources
``prefill_pool`` / ``decode_pool`` that the pool's nodes advertise. Started
before those nodes have joined (right after the head comes up, while the
autoscaler or KubeRay still boots the GPU nodes), serve would see no pool
resources and place actors anywhere. The deployments therefore run this first:

    kvcluster-wait-pools --config cluster.yaml [--timeout 1800] && kvcluster serve ...

Exit 0 once ``prefill_pool >= workers.num_prefill`` (unless colocated) and
``decode_pool >= workers.num_decode``; exit 1 on timeout, printing what is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def missing_pools(config, resources: dict[str, float]) -> dict[str, tuple[float, int]]:
    """Pools short of nodes: name -> (advertised, needed)."""
    needed = {"decode_pool": config.workers.num_decode}
    if not config.workers.colocated:
        needed["prefill_pool"] = config.workers.num_prefill
    return {pool: (resources.get(pool, 0.0), count) for pool, count in needed.items()
            if resources.get(pool, 0.0) < count}


def wait_for_pools(config, timeout_s: float, poll_s: float = 5.0, log=print) -> bool:
    """Poll ``ray.cluster_resources()`` (Ray already initialised) until no pool is short."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        short = missing_pools(config, ray.cluster_resources())
        if not short:
            return True
        if time.monotonic() >= deadline:
            log("timed out; still short: " + _describe(short))
            return False
        log("waiting for pool nodes: " + _describe(short))
        time.sleep(poll_s)


def _describe(short: dict[str, tuple[float, int]]) -> str:
    return ", ".join(f"{pool} {have:g}/{need}" for pool, (have, need) in sorted(short.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the cluster file serve will read")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between checks")
    args = parser.parse_args(argv)

    import ray

    from kvcluster.common.config import load_config

    config = load_config(args.config)
    ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    try:
        ready = wait_for_pools(config, args.timeout, args.poll, log=lambda m: print(m, flush=True))
    finally:
        ray.shutdown()
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
