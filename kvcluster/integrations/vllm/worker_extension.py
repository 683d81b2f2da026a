"""Methods kvcluster adds to vLLM's worker (``worker_extension_cls``), for the PD path.

vLLM's worker process owns the connector's worker half, and with it the kvstore whose
host/disk/Redis tiers hold an instance's chunks. A Ray actor reaches them through
``AsyncLLM.collective_rpc("kvcluster_get_chunks" | "kvcluster_put_chunks", ...)``:

    prefill actor:  vLLM computes the prompt (the connector stores its whole chunks)
                    -> kvcluster_get_chunks(keys) -> KV -> kvcluster's transfer
    decode actor:   transfer -> KV -> kvcluster_put_chunks(keys, KV) -> host tier
                    -> vLLM schedules the request: the connector loads the chunks into
                       its paged blocks (or, if they are gone by then, vLLM recomputes)
"""

from __future__ import annotations

import dataclasses

import torch

from kvcluster.common.hashing import BlockHash
from kvcluster.common.layout import KVLayout
from kvcluster.engine.dtypes import torch_dtype

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

    def kvcluster_get_chunks(self, chunk_keys: list[bytes]) -> bytes:
        """The stored prefix of ``chunk_keys``: the raw bytes of KV ``[L, 2, n * C, H, D]``
        (the store's layout and dtype) of its first n chunks found in the tiers; b"" when
        the first is missing. Bytes, not a tensor: vLLM's RPC encoding turns a returned
        tensor into nested lists."""
        side = _worker_side()
        keys = [BlockHash(k) for k in chunk_keys]
        with side.store.pinned(keys):
            if not side.store.lookup(keys).num_chunks:
                return b""
            return to_bytes(side.store.get(keys))

    def kvcluster_put_chunks(self, chunk_keys: list[bytes], kv_bytes: bytes,
                             tenant: str) -> int:
        """Store whole chunks (raw bytes of ``[L, 2, len(keys) * C, H, D]``); returns how
        many were new. Their tier events reach the scheduler with the next step."""
        side = _worker_side()
        keys = [BlockHash(k) for k in chunk_keys]
        kv = from_bytes(kv_bytes, side.layout, len(keys) * side.settings.chunk_tokens)
        return side.store.put(keys, kv, tenant=tenant)


def to_bytes(kv: torch.Tensor) -> bytes:
    return kv.contiguous().view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, layout: KVLayout, num_tokens: int) -> torch.Tensor:
    """KV ``layout.shape(num_tokens)`` over ``data`` (copied: writable, owns its memory).

    Raises: ValueError when ``data`` is not exactly that many bytes."""
    shape = layout.shape(num_tokens)
    dtype = torch_dtype(layout.dtype)
    expected = layout.dtype_size
    for n in shape:
        expected *= n
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes of KV for {num_tokens} tokens of {layout} "
                         f"(expected {expected})")
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


def _worker_side():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()._worker_side()
