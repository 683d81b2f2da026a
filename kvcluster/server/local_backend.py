"""The embedded, colocated backend: one :class:`LLMEngine` stepped by one background thread.

    asyncio side (front end)                    engine thread
    ------------------------                    -------------
    generate(): admit, queue "add"   ---->      apply commands (add / abort / finish)
                await entry.queue    <----      step(); each token -> call_soon_threadsafe
    closed/cancelled: queue "abort"  ---->      abort: blocks freed

The engine is touched only by its thread; the asyncio side talks to it through
a command queue and gets events through per-request asyncio queues. Admission
is bounded: with ``max_queue`` requests in flight a new one is refused
(RESOURCE_EXHAUSTED, "overloaded"). Each tenant is the request's prefix-cache
salt, so tenants never share cached blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from kvcluster.common.config import ClusterConfig
from kvcluster.common.errors import (
    InvalidRequestError,
    KVClusterError,
    OverloadedError,
    UnavailableError,
)
from kvcluster.common.requests import FinalEvent, GenerateRequest, TokenEvent
from kvcluster.engine.llm_engine import LLMEngine, StepOutput
from kvcluster.engine.sequence import Sequence
from kvcluster.server.backend import FINISH, GenerateBackend

log = logging.getLogger("kvcluster.local_backend")


async def start_local_backend(config: ClusterConfig, instance_id: str = "local-0"
                              ) -> GenerateBackend:
    """The embedded backend for ``config.engine.kind``: this module's LocalBackend for
    the native engine, a :class:`~kvcluster.server.worker_backend.WorkerBackend` over a
    vLLM decode worker for ``vllm``."""
    if config.engine.kind == "native":
        return LocalBackend.from_config(config, instance_id)
    from kvcluster.server.worker_backend import WorkerBackend

    return await WorkerBackend.start(config, instance_id)


@dataclass
class _Entry:
    """One in-flight request, shared by both sides (events cross by call_soon_threadsafe)."""

    request: GenerateRequest
    engine_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    ttft_ms: float = 0.0


class LocalBackend(GenerateBackend):
    def __init__(self, engine: LLMEngine, *, instance_id: str = "local-0", max_queue: int = 64,
                 min_step_interval_s: float = 0.0):
        """
        Args:
            max_queue: requests in flight (waiting + running) before new ones are refused.
            min_step_interval_s: throttle: at least this long between engine steps
                (0: as fast as possible; tests and demos use it to slow generation).
        """
        self.engine = engine
        self.instance_id = instance_id
        self.max_queue = max_queue
        self.min_step_interval_s = min_step_interval_s
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name=f"engine-{instance_id}", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: ClusterConfig, instance_id: str = "local-0",
                    **kwargs) -> "LocalBackend":
        """Load ``config.model`` into a fresh engine."""
        from kvcluster.engine.runner import ModelRunner

        runner = ModelRunner.from_pretrained(config.model.path, dtype=config.model.dtype,
                                             device=config.model.device,
                                             engine_config=config.engine,
                                             model_id=config.model.model_id or None)
        kwargs.setdefault("max_queue", config.workers.max_queue)
        return cls(LLMEngine(runner), instance_id=instance_id, **kwargs)

    async def generate(self, request: GenerateRequest):
        entry = self._admit(request)
        finished = False
        try:
            while True:
                item = await entry.queue.get()
                if isinstance(item, KVClusterError):
                    finished = True
                    raise item
                command = yield item
                if isinstance(item, FinalEvent):
                    finished = True
                    return
                if command == FINISH:
                    self._send("finish", entry.engine_id)
        finally:
            if not finished:
                self._send("abort", entry.engine_id)

    async def healthy(self) -> bool:
        return not self._closed and self._thread.is_alive()

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    @property
    def num_in_flight(self) -> int:
        """Requests admitted and not yet finished, aborted or failed."""
        return len(self._entries)

    @property
    def num_engine_requests(self) -> int:
        """Requests the engine still holds (waiting or running)."""
        return len(self.engine.sequences)

    # ------------------------------------------------------------------ asyncio side

    def _admit(self, request: GenerateRequest) -> _Entry:
        if self._closed:
            raise UnavailableError("backend is shut down")
        engine_id = f"{request.request_id}#{next(self._ids)}"  # unique even if ids repeat
        entry = _Entry(request, engine_id, asyncio.get_running_loop())
        with self._lock:
            if len(self._entries) >= self.max_queue:
                raise OverloadedError(f"overloaded: {len(self._entries)} requests in flight "
                                      f"(limit {self.max_queue}); retry later")
            self._entries[engine_id] = entry
        self._send("add", engine_id)
        return entry

    def _send(self, command: str, engine_id: str) -> None:
        self._commands.put((command, engine_id))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while not self._closed:
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            began = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving
                log.exception("engine step failed")
                self._fail_all(KVClusterError(f"engine step failed: {exc}"))  # INTERNAL
                continue
            self._deliver(outputs)
            rest = self.min_step_interval_s - (time.perf_counter() - began)
            if rest > 0:
                time.sleep(rest)
        self._fail_all(UnavailableError("backend is shut down"))

    def _apply_commands(self) -> None:
        while True:
            try:
                command, engine_id = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                self._add(engine_id)
            elif command == "abort":
                self.engine.abort(engine_id)
                self._forget(engine_id)
            elif command == "finish":
                self._finish_early(engine_id)

    def _add(self, engine_id: str) -> None:
        entry = self._entries.get(engine_id)
        if entry is None:
            return
        request = entry.request
        try:
            self.engine.add_request(engine_id, request.prompt_token_ids, request.params,
                                    tenant_salt=request.tenant)
        except ValueError as exc:
            self._post(entry, InvalidRequestError(str(exc)))
            self._forget(engine_id)

    def _finish_early(self, engine_id: str) -> None:
        entry = self._entries.get(engine_id)
        seq = self.engine.sequences.get(engine_id)
        self.engine.abort(engine_id)
        if entry is not None and seq is not None:
            self._post(entry, self._final(entry, seq, "stop"))
            self._forget(engine_id)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            entry = self._entries.get(out.request_id)
            if entry is None:  # aborted meanwhile
                self.engine.abort(out.request_id)
                continue
            if not entry.ttft_ms:
                entry.ttft_ms = (time.perf_counter() - entry.submitted) * 1e3
            self._post(entry, TokenEvent((out.token_id,)))
            if out.finished:
                seq = self.engine.pop(out.request_id)
                self._post(entry, self._final(entry, seq, seq.finish_reason))
                self._forget(out.request_id)

    def _final(self, entry: _Entry, seq: Sequence, reason: str) -> FinalEvent:
        stage_ms = {}
        if seq.first_token_s:  # the engine's own clock: its queue, then the prefill step
            stage_ms = {"queue": (seq.scheduled_s - seq.arrival_s) * 1e3,
                        "first_decode_step": (seq.first_token_s - seq.scheduled_s) * 1e3}
        by_tier = {"prefix_cache": seq.num_cached_tokens} if seq.num_cached_tokens else {}
        return FinalEvent(reason, entry.ttft_ms, self.instance_id, self.instance_id,
                          seq.num_prompt_tokens, seq.num_cached_tokens, len(seq.output_ids),
                          entry.request.request_id, cached_tokens_by_tier=by_tier,
                          stage_ms=stage_ms)

    def _fail_all(self, error: KVClusterError) -> None:
        for engine_id, entry in list(self._entries.items()):
            self.engine.abort(engine_id)
            self._post(entry, error)
            self._forget(engine_id)

    def _post(self, entry: _Entry, item) -> None:
        try:
            entry.loop.call_soon_threadsafe(entry.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            self._send("abort", entry.engine_id)

    def _forget(self, engine_id: str) -> None:
        with self._lock:
            self._entries.pop(engine_id, None)
