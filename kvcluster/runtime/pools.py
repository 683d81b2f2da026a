"""The two worker pools as Ray actors: placement, start-up and restarts.

Ray is the control plane only: it places the actors (one GPU each when the
cluster has GPUs; on the nodes that carry the ``prefill_pool`` /
``decode_pool`` custom resources when the cluster defines them), restarts
them when they die, and carries small task messages. KV moves over gRPC.

Actors are named ``kvcluster-<role>-<n>`` in the ``kvcluster`` namespace and
created with ``get_if_exists``: a front end that finds the pools running
attaches to them. With ``workers.detached`` they also outlive the front end
that started them, so several front ends (router replicas) share one set of
pools; each checks that the pools run its worker config (a digest of every
section the workers read) and refuses to start otherwise.

Workers authenticate each other (the KV stream) with a cluster-internal secret:
the configured ``security.internal_token`` (or ``_file``), else one generated
once per Ray cluster and kept in Ray's internal KV, so every front end that
attaches hands its actors the same one (and their config digests agree).
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field, replace

from kvcluster.common.config import ClusterConfig, to_dict, worker_config_digest

log = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"
NAMESPACE = "kvcluster"
class PoolConfigMismatch(RuntimeError):
    """Running pools were started with another worker config."""


@dataclass
class WorkerHandle:
    instance_id: str
    role: str
    actor: object
    """The Ray actor handle."""
    address: str = ""
    """The decode worker's KV receiver (host:port)."""
    info: dict = field(default_factory=dict)
    """The actor's ``info()`` at start: model id, block size, config digest, ..."""


def init_local_ray(num_cpus: int | None = None) -> None:
    """Join the Ray cluster in ``RAY_ADDRESS``, else start a local one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    common = dict(namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**common)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    ray.init(num_cpus=num_cpus, include_dashboard=False, **common)


def stop_pools(config: ClusterConfig) -> int:
    """Kill the named actors of ``config``'s pools that are running; returns how many."""
    import ray

    killed = 0
    roles = [(DECODE, config.workers.num_decode)]
    if not config.workers.colocated:
        roles.append((PREFILL, config.workers.num_prefill))
    for role, count in roles:
        for number in range(count):
            try:
                actor = ray.get_actor(f"kvcluster-{role}-{number}", namespace=NAMESPACE)
            except ValueError:  # not running
                continue
            ray.kill(actor, no_restart=True)
            killed += 1
    return killed


class WorkerPools:
    def __init__(self, config: ClusterConfig, kv_events_publish: dict[str, str] | None = None):
        """``kv_events_publish``: role -> the front end's ZMQ subscriber address for that
        pool, handed to its actors, whose engines publish their own KV events
        (engine.kind vllm)."""
        self.config = config
        self.kv_events_publish = dict(kv_events_publish or {})
        self.prefill: list[WorkerHandle] = []
        self.decode: list[WorkerHandle] = []

    def start(self, timeout_s: float = 600.0) -> None:
        """Create (or attach to) every actor and wait until each has loaded its model.

        Raises:
            PoolConfigMismatch: an existing actor runs another worker config.
        """
        import ray

        self.config = with_internal_secret(self.config)
        workers = self.config.workers
        if not workers.colocated:
            self.prefill = [self._spawn(PREFILL, i) for i in range(workers.num_prefill)]
        self.decode = [self._spawn(DECODE, i) for i in range(workers.num_decode)]
        handles = self.prefill + self.decode
        results = ray.get([h.actor.ready.remote() for h in handles], timeout=timeout_s)
        for handle, result in zip(handles, results):
            if handle.role == DECODE:
                handle.address = result
        infos = ray.get([h.actor.info.remote() for h in handles], timeout=timeout_s)
        for handle, info in zip(handles, infos):
            handle.info = info
        self._check_digests()

    def by_id(self, instance_id: str) -> WorkerHandle:
        for handle in self.prefill + self.decode:
            if handle.instance_id == instance_id:
                return handle
        raise KeyError(instance_id)

    def shutdown(self, kill: bool | None = None) -> None:
        """Let go of the pools; kill the actors unless they are detached (``kill`` overrides)."""
        import ray

        if kill if kill is not None else not self.config.workers.detached:
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
        lifetime = {"lifetime": "detached"} if self.config.workers.detached else {}
        publish = self.kv_events_publish.get(role, "")
        args = (publish,) if publish else ()
        actor = ray.remote(cls).options(
            name=f"kvcluster-{instance_id}", namespace=NAMESPACE, get_if_exists=True,
            max_restarts=-1, max_concurrency=64, **lifetime,
            **_placement(role)).remote(to_dict(self.config), instance_id, *args)
        return WorkerHandle(instance_id, role, actor)

    def _check_digests(self) -> None:
        ours = worker_config_digest(self.config)
        for handle in self.prefill + self.decode:
            info = handle.info
            if info.get("config_digest") != ours:
                raise PoolConfigMismatch(
                    f"{handle.instance_id} runs another worker config (digest "
                    f"{str(info.get('config_digest'))[:12]}, ours {ours[:12]}): serve with the "
                    f"config the pools were started with, or stop them first "
                    f"(kvcluster pools stop --config ...)")


INTERNAL_SECRET_KEY = b"kvcluster:internal-token"
"""Ray internal-KV key (namespace kvcluster) of the generated cluster-internal secret."""


def with_internal_secret(config: ClusterConfig) -> ClusterConfig:
    """``config`` with a cluster-internal secret for the workers: the configured one,
    else this Ray cluster's generated one (put there by the first caller)."""
    security = config.security
    if security.internal_token or security.internal_token_file:
        return config
    return replace(config, security=replace(security, internal_token=_cluster_secret()))


def _cluster_secret() -> str:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(INTERNAL_SECRET_KEY, secrets.token_urlsafe(32).encode(),
                                 overwrite=False, namespace=NAMESPACE)  # put if absent
    return internal_kv._internal_kv_get(INTERNAL_SECRET_KEY, namespace=NAMESPACE).decode()


def _placement(role: str) -> dict:
    """GPU per actor when the cluster has GPUs; the pool's nodes when labelled."""
    import ray

    resources = ray.cluster_resources()
    options: dict = {"num_gpus": 1} if resources.get("GPU", 0) >= 1 else {"num_cpus": 0}
    pool = f"{role}_pool"
    if resources.get(pool, 0) > 0:
        options["resources"] = {pool: 0.001}
    return options
