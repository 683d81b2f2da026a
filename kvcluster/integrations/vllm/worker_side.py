"""The connector's worker half: the kvstore, and the copies between it and vLLM's blocks.

Runs in vLLM's worker process, which owns the paged KV tensors. Each step, before the
forward, it copies the planned chunks from the tiers into the request's blocks
(``load``); after the forward, it copies newly computed whole chunks out of the blocks
into the tiers (``save``). The store's events (stored / removed / moved between tiers)
go back to the scheduler half with the step's output, which mirrors them and publishes
them in vLLM's KV event stream.

vLLM's paged cache is the device tier here, so the store's own device tier is off:
chunks live in host memory, then on disk, then in Redis, as configured.

PD: a decode instance's worker runs the KV receiver (pd_receiver.PDReceiver, started
on the first ``pd_address`` call) that writes streams straight into the blocks; a
prefill instance's worker streams each step's whole chunks (pd_sender.PDSender).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Mapping

import torch
from vllm.distributed.kv_events import BlockRemoved, BlockStored

from kvcluster.common.config import StoreConfig
from kvcluster.common.event_media import MEDIUM_OF_TIER
from kvcluster.common.events import AllCleared
from kvcluster.common.events import BlockRemoved as OurRemoved
from kvcluster.common.events import BlockStored as OurStored
from kvcluster.common.events import KVEvent
from kvcluster.common.hashing import BlockHash
from kvcluster.common.layout import KVLayout
from kvcluster.integrations.vllm.metadata import OWNERSHIP, ConnectorMeta, ConnectorSettings
from kvcluster.integrations.vllm.paged_kv import PagedKV, PagedShape
from kvcluster.integrations.vllm.pd_receiver import PDReceiver
from kvcluster.integrations.vllm.pd_sender import PDSender
from kvstore import build_store
from kvstore.tiers.factory import default_disk_directory

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class WorkerSide:
    def __init__(self, settings: ConnectorSettings, shape: PagedShape, num_layers: int,
                 dtype: torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"KV dtype {dtype} is not one the kvstore holds "
                             f"({sorted(DTYPE_NAMES.values())})")
        self.settings = settings
        self.shape = shape
        self.layout = KVLayout(num_layers, shape.num_kv_heads, shape.head_dim,
                               settings.hash_block_size, DTYPE_NAMES[dtype])
        self.store = build_store(store_config(settings.config.store, settings.instance_id),
                                 self.layout, device="cpu", model_id=settings.model_id)
        self.paged: PagedKV | None = None
        self.pd_receiver: PDReceiver | None = None
        self.pd_sender: PDSender | None = None
        self._lock = threading.Lock()
        self._events: list = []
        self.store.on_event.append(self._on_event)
        for event in self.store.snapshot_events():  # e.g. chunks a disk tier kept
            self._on_event(event)

    def register(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        self.paged = PagedKV.from_kv_caches(kv_caches, self.shape)
        if self.paged.num_layers != self.layout.num_layers:
            raise ValueError(f"{self.paged.num_layers} KV cache tensors for a model of "
                             f"{self.layout.num_layers} layers")

    def load(self, meta: ConnectorMeta) -> set[int]:
        """Copy each planned load into its blocks. Returns the blocks that could not be
        filled (their chunks left the tiers since planning): vLLM recomputes them."""
        failed: set[int] = set()
        for spec in meta.loads:
            failed.update(self._load_one(spec))
        return failed

    def save(self, meta: ConnectorMeta) -> None:
        for spec in meta.saves:
            kv = self._paged().gather(spec.block_ids)  # [L, 2, n * C, H, D]
            keys = [BlockHash(d) for d in spec.chunk_keys]
            self.store.put(keys, kv, tenant=spec.tenant)

    def pd_address(self) -> str:
        """The KV receiver's ``host:port`` (started on the first call)."""
        if self.pd_receiver is None:
            self.pd_receiver = PDReceiver(self.settings.config, self.layout, self._paged())
            self.pd_receiver.start()
        return self.pd_receiver.address

    def pd_expect(self, meta: ConnectorMeta) -> None:
        """This step's requests that wait for a stream: where to write it."""
        for spec in meta.recvs:
            self._receiver().expect(spec)

    def pd_send(self, meta: ConnectorMeta) -> None:
        """After the forward: open this step's streams, hand over its whole chunks."""
        for spec in meta.sends:
            if self.pd_sender is None:
                self.pd_sender = PDSender(self.settings.config, self.layout)
            if spec.target:
                self.pd_sender.start(spec)
            if spec.block_ids:  # a copy: the blocks may be freed once the step ends
                kv = self._paged().gather(spec.block_ids)  # [L, 2, n * B, H, D]
                self.pd_sender.add(spec.request_id, spec.first_token, kv)

    def pd_poll(self, finished_req_ids: set[str]) -> tuple[set[str], set[int]]:
        """Requests done receiving, and blocks the streams did not fill."""
        if self.pd_sender is not None:
            self.pd_sender.finished(finished_req_ids)
        if self.pd_receiver is None:
            return set(), set()
        return self.pd_receiver.poll(finished_req_ids)

    def take_events(self) -> list:
        with self._lock:
            events, self._events = self._events, []
        return events

    def close(self) -> None:
        for part in (self.pd_receiver, self.pd_sender):
            if part is not None:
                part.close()
        self.store.flush()
        self.store.close()

    # ------------------------------------------------------------ helpers

    def _load_one(self, spec) -> list[int]:
        C, B = self.settings.chunk_tokens, self.shape.block_size
        keys = [BlockHash(d) for d in spec.chunk_keys]
        kv = self.store.get(keys)  # [L, 2, found * C, H, D]
        found_end = spec.first_chunk * C + kv.shape[2]
        offset = spec.first_token - spec.first_chunk * C
        num_ok = max(0, (found_end - spec.first_token) // B)
        num_ok = min(num_ok, len(spec.block_ids))
        if num_ok:
            self._paged().scatter(spec.block_ids[:num_ok], kv[:, :, offset: offset + num_ok * B])
        if num_ok < len(spec.block_ids):
            log.warning("request %s: %d of %d planned blocks left the tiers before loading; "
                        "vLLM recomputes them", spec.request_id,
                        len(spec.block_ids) - num_ok, len(spec.block_ids))
        return spec.block_ids[num_ok:]

    def _receiver(self) -> PDReceiver:
        if self.pd_receiver is None:  # a RecvSpec before pd_address: no stream can come
            self.pd_address()
        assert self.pd_receiver is not None
        return self.pd_receiver

    def _paged(self) -> PagedKV:
        if self.paged is None:
            raise RuntimeError("vLLM never registered its KV caches with the connector")
        return self.paged

    def _on_event(self, event: KVEvent) -> None:
        """Store callback (under the store's lock, maybe on a disk thread): queue it."""
        converted = to_vllm_event(event, self.settings.chunk_tokens)
        if converted is None:
            return
        with self._lock:
            self._events.append(converted)


def to_vllm_event(event: KVEvent, chunk_tokens: int):
    """A kvstore event as vLLM's event type, marked as kvcluster's (chunk keys)."""
    if isinstance(event, OurStored):
        return BlockStored(block_hashes=list(event.block_hashes),
                           parent_block_hash=event.parent_hash, token_ids=[],
                           block_size=chunk_tokens, lora_id=None,
                           medium=MEDIUM_OF_TIER[event.tier], lora_name=None,
                           ownership=OWNERSHIP)
    if isinstance(event, OurRemoved):
        return BlockRemoved(block_hashes=list(event.block_hashes),
                            medium=MEDIUM_OF_TIER[event.tier], ownership=OWNERSHIP)
    if isinstance(event, AllCleared):  # the connector never clears its store
        log.error("kvstore cleared: the router keeps stale tier entries until they miss")
    return None


def store_config(store: StoreConfig, instance_id: str) -> StoreConfig:
    """The store section for one vLLM instance: no device tier (vLLM's paged cache is
    that), and its own folder under the disk directory."""
    device = dataclasses.replace(store.device, enabled=False)
    store = dataclasses.replace(store, device=device)
    if store.disk.enabled:
        base = store.disk.directory or default_disk_directory()
        disk = dataclasses.replace(store.disk, directory=str(Path(base) / instance_id))
        store = dataclasses.replace(store, disk=disk)
    return store
