"""The two worker pools as Ray actors: placement, start-up and restarts.

Ray is the control plane only: it places the actors (one GPU each when the
cluster has GPUs; on the nodes that carry the ``prefill_pool`` /
``decode_pool`` custom resources when the cluster defines them), restarts
them when they die, and carries small task messages. KV moves over gRPC.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from kvcluster.common.config import ClusterConfig, to_dict

log = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"


@dataclass
class WorkerHandle:
    instance_id: str
    role: str
    actor: object
    """The Ray actor handle."""
    address: str = ""
    """The decode worker's KV receiver (host:port)."""


def init_local_ray(num_cpus: int | None = None) -> None:
    """Join the Ray cluster in ``RAY_ADDRESS``, else start a local one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    common = dict(namespace="kvcluster", log_to_driver=False, configure_logging=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**common)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    ray.init(num_cpus=num_cpus, include_dashboard=False, **common)


class WorkerPools:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.prefill: list[WorkerHandle] = []
        self.decode: list[WorkerHandle] = []

    def start(self, timeout_s: float = 600.0) -> None:
        """Create every actor and wait until each has loaded its model."""
        import ray

        workers = self.config.workers
        if not workers.colocated:
            self.prefill = [self._spawn(PREFILL, i) for i in range(workers.num_prefill)]
        self.decode = [self._spawn(DECODE, i) for i in range(workers.num_decode)]
        handles = self.prefill + self.decode
        results = ray.get([h.actor.ready.remote() for h in handles], timeout=timeout_s)
        for handle, result in zip(handles, results):
            if handle.role == DECODE:
                handle.address = result

    def by_id(self, instance_id: str) -> WorkerHandle:
        for handle in self.prefill + self.decode:
            if handle.instance_id == instance_id:
                return handle
        raise KeyError(instance_id)

    def shutdown(self) -> None:
        import ray

        for handle in self.prefill + self.decode:
            ray.kill(handle.actor, no_restart=True)
        self.prefill, self.decode = [], []

    # ------------------------------------------------------------ helpers

    def _spawn(self, role: str, number: int) -> WorkerHandle:
        import ray

        from decode_worker.actor import DecodeActor
        from prefill_worker.actor import PrefillActor

        instance_id = f"{role}-{number}"
        cls = PrefillActor if role == PREFILL else DecodeActor
        actor = ray.remote(cls).options(
            name=f"kvcluster-{instance_id}", max_restarts=-1, max_concurrency=64,
            **_placement(role)).remote(to_dict(self.config), instance_id)
        return WorkerHandle(instance_id, role, actor)


def _placement(role: str) -> dict:
    """GPU per actor when the cluster has GPUs; the pool's nodes when labelled."""
    import ray

    resources = ray.cluster_resources()
    options: dict = {"num_gpus": 1} if resources.get("GPU", 0) >= 1 else {"num_cpus": 0}
    pool = f"{role}_pool"
    if resources.get(pool, 0) > 0:
        options["resources"] = {pool: 0.001}
    return options
