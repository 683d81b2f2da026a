"""PDSender: a vLLM prefill instance streams a request's whole chunks to its decode
instance, from vLLM's worker process, while vLLM computes the rest of the prompt.

    the scheduler's SendSpec (first step of a request): open the stream now
        -> KVSender on this object's own thread and loop (adaptive level per chunk,
           text fallback, checksums, the data plane)
    after each forward (wait_for_save): PagedKV.gather the whole chunks the step
        completed (a copy: vLLM may free the blocks) -> add(): the stream sends them

The stream's chunk source holds the whole token range from the start; a chunk's
payload waits (in the sender's encode thread) until its tokens are computed, so a long
prompt prefilled over several vLLM steps (chunked prefill) is on the wire while the
rest computes. If vLLM finishes the request before its last chunk (aborted), the
waiting payload fails and the stream ends: the decoder computes what is missing.

The outcome (wire bytes, levels, ok) waits in :meth:`take_result` for the prefill actor.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future

import torch

from kvcluster.common.config import ClusterConfig
from kvcluster.common.layout import KVLayout
from kvcluster.engine.dtypes import torch_dtype
from kvcluster.integrations.vllm.metadata import SendSpec
from kvcluster.transfer.levels import LevelSet
from kvcluster.transfer.messages import TEXT_LEVEL
from kvcluster.transfer.source import ChunkSource
from kvcluster.worker.sender_pool import SenderPool

log = logging.getLogger(__name__)

MAX_RESULTS = 1024
"""Outcomes kept for the prefill actor to take; the oldest go first."""


class ComputedSource(ChunkSource):
    """A ChunkSource over KV that is still being computed: ``add`` fills token ranges
    in order; a payload waits for its chunk's tokens (or fails with ``fail``)."""

    def __init__(self, token_ids, layout: KVLayout, levels: LevelSet, chunk_tokens: int):
        kv = torch.empty(layout.shape(len(token_ids)), dtype=torch_dtype(layout.dtype))
        super().__init__(token_ids, layout, levels, chunk_tokens, kv=kv)
        self.ready_end = 0
        self.failed = ""
        self._ready = threading.Condition()

    def add(self, start: int, kv: torch.Tensor) -> None:
        """KV ``[L, 2, n, H, D]`` of tokens ``[start, start + n)``, ``start`` = ready_end."""
        end = min(start + kv.shape[2], self.num_tokens)
        with self._ready:
            if start != self.ready_end:
                raise ValueError(f"tokens from {start} added after {self.ready_end}")
            self.kv[:, :, start:end] = kv[:, :, :end - start]
            self.ready_end = end
            self._ready.notify_all()

    def fail(self, why: str) -> None:
        with self._ready:
            self.failed = self.failed or why
            self._ready.notify_all()

    def payload(self, index: int, level: str) -> bytes:
        if level != TEXT_LEVEL and not self.has_payload(index, level):
            self._wait_for(self.specs[index].token_end)
        return super().payload(index, level)

    def _wait_for(self, token_end: int) -> None:
        with self._ready:
            while self.ready_end < token_end and not self.failed:
                self._ready.wait()
            if self.ready_end < token_end:
                raise RuntimeError(f"KV of tokens up to {token_end} never computed: "
                                   f"{self.failed}")


class PDSender:
    def __init__(self, config: ClusterConfig, layout: KVLayout):
        self.config = config
        self.layout = layout
        self.senders = SenderPool(config)
        self._sources: dict[str, ComputedSource] = {}
        """vLLM request id -> its stream's source, until its last chunk is added."""
        self._results: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="kvcluster-pd-sender", daemon=True)
        self._thread.start()

    def start(self, spec: SendSpec) -> None:
        """Open the stream of ``spec.transfer_id`` to ``spec.target`` (its first step)."""
        source = ComputedSource(spec.token_ids, self.layout, self.senders.levels,
                                self.config.transfer.chunk_tokens)
        with self._lock:
            self._sources[spec.request_id] = source
        asyncio.run_coroutine_threadsafe(self._send(spec, source), self._loop)

    def add(self, request_id: str, start: int, kv: torch.Tensor) -> None:
        """Computed KV ``[L, 2, n, H, D]`` of tokens from ``start`` (whole chunks)."""
        with self._lock:
            source = self._sources.get(request_id)
        if source is None:
            return
        source.add(start, kv)
        if source.ready_end >= source.num_tokens:
            with self._lock:
                self._sources.pop(request_id, None)

    def finished(self, request_ids: set[str]) -> None:
        """vLLM finished these requests: a stream still missing chunks ends."""
        with self._lock:
            gone = [self._sources.pop(r) for r in request_ids if r in self._sources]
        for source in gone:
            source.fail("vLLM finished the request before its last chunk")

    def take_result(self, transfer_id: str) -> dict | None:
        """The stream's outcome once it ended (then forgotten); None: not yet."""
        with self._lock:
            return self._results.pop(transfer_id, None)

    def close(self) -> None:
        with self._lock:
            sources = list(self._sources.values())
        for source in sources:
            source.fail("connector shut down")
        future: Future = asyncio.run_coroutine_threadsafe(self.senders.close(),
                                                                 self._loop)
        try:
            future.result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # ------------------------------------------------------------ helpers (own loop)

    async def _send(self, spec: SendSpec, source: ComputedSource) -> None:
        try:
            sent = await self.senders.sender(spec.target).send(source, spec.transfer_id,
                                                               spec.slo_ms or None)
            result = _result_dict(sent, source)
        except Exception as exc:  # noqa: BLE001 - the decoder computes what is missing
            log.warning("stream %s to %s failed: %r", spec.transfer_id, spec.target, exc)
            result = {"ok": False, "message": repr(exc), "elapsed_s": 0.0, "bytes_sent": 0,
                      "levels": [], "data_plane": "", "num_tokens": 0, "chunk_bytes": []}
        if not result["ok"]:
            log.warning("stream %s to %s: %s", spec.transfer_id, spec.target,
                        result["message"])
        with self._lock:
            self._results[spec.transfer_id] = result
            while len(self._results) > MAX_RESULTS:
                self._results.popitem(last=False)



def _result_dict(sent, source: ComputedSource) -> dict:
    """A SendResult as plain data (vLLM's RPC returns it to the prefill actor)."""
    chunk_bytes = [(level, len(source.payload(i, level)) if source.has_payload(i, level) else 0)
                   for i, level in enumerate(sent.levels) if level]
    return {"ok": sent.ok, "message": sent.message,
            "elapsed_s": sent.elapsed_s, "bytes_sent": sent.bytes_sent,
            "levels": list(sent.levels), "data_plane": sent.data_plane,
            "num_tokens": source.num_tokens, "chunk_bytes": chunk_bytes}
