"""Methods kvcluster adds to vLLM's worker (``worker_extension_cls``).

vLLM's worker process owns the connector's worker half: the kvstore whose host/disk/
Redis tiers hold an instance's chunks, and, for PD, the KV receiver and sender. A Ray
actor reaches them through ``AsyncLLM.collective_rpc("kvcluster_...")``:

    decode actor:   kvcluster_pd_address -> the receiver's host:port, advertised to the
                    prefill pool; kvcluster_pd_abandon when a request's prefill failed
    prefill actor:  kvcluster_pd_send_result -> the stream's outcome (PrefillResult)

Every call returns at once: it runs between two of vLLM's steps.
"""

from __future__ import annotations

import dataclasses

EXTENSION_CLASS = "kvcluster.integrations.vllm.worker_extension.KVClusterWorkerExtension"


class KVClusterWorkerExtension:
    """Mixed into vLLM's Worker class; ``self`` is the worker."""

    def kvcluster_layout(self) -> dict:
        """The KV layout of the worker's store (KVLayout's fields): what travels."""
        return dataclasses.asdict(_worker_side().layout)

    def kvcluster_tier_stats(self) -> dict:
        """Per-tier usage and hits of the worker's store, for ``kvcluster status``."""
        store = _worker_side().store
        metrics = store.metrics
        return {"tiers": {
            t.name: {"used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes,
                     "hits": metrics.value("kvstore_hits_total", tier=t.name), "up": t.is_up}
            for t in store.tiers}, "misses": metrics.value("kvstore_misses_total")}

    def kvcluster_pd_address(self) -> str:
        """``host:port`` of this instance's KV receiver (started on the first call)."""
        return _worker_side().pd_address()

    def kvcluster_pd_abandon(self, transfer_id: str) -> None:
        """Nobody will stream ``transfer_id``: its request stops waiting (vLLM computes)."""
        side = _worker_side()
        if side.pd_receiver is not None:
            side.pd_receiver.abandon(transfer_id)

    def kvcluster_pd_send_result(self, transfer_id: str) -> dict | None:
        """The outcome of ``transfer_id``'s stream once it ended (taken); None: not yet."""
        sender = _worker_side().pd_sender
        return sender.take_result(transfer_id) if sender is not None else None

    def kvcluster_pd_receiver_stats(self) -> dict:
        """The KV receiver's streams and outcomes ({} when it never started)."""
        receiver = _worker_side().pd_receiver
        return receiver.snapshot() if receiver is not None else {}


def _worker_side():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()._worker_side()
