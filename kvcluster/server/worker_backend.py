"""WorkerBackend: the embedded backend over one in-process decode worker of any engine.

    generate(request) -> DecodeTask -> worker.generate -> DecodeStep* -> TokenEvent* FinalEvent

The worker (decode_worker.factory) computes the whole prompt itself, as a colocated
pool does; it owns admission (``workers.max_queue``: RESOURCE_EXHAUSTED) and the error
codes. ``engine.kind: vllm`` is served this way in-process (the native engine keeps
:class:`~kvcluster.server.local_backend.LocalBackend`, which steps its engine directly).
"""

from __future__ import annotations

import contextlib
import time

from decode_worker.base import DecodeWorkerBase
from decode_worker.factory import build_decode_worker
from kvcluster.common.config import ClusterConfig
from kvcluster.common.errors import UnavailableError
from kvcluster.common.requests import FinalEvent, GenerateRequest, TokenEvent
from kvcluster.common.tasks import DecodeStep, DecodeTask
from kvcluster.server.backend import GenerateBackend


class WorkerBackend(GenerateBackend):
    def __init__(self, worker: DecodeWorkerBase):
        """``worker`` started (``await worker.start()``) by the caller."""
        self.worker = worker
        self._closed = False

    @classmethod
    async def start(cls, config: ClusterConfig, instance_id: str = "local-0"
                    ) -> "WorkerBackend":
        worker = build_decode_worker(config, instance_id)
        await worker.start()
        return cls(worker)

    async def generate(self, request: GenerateRequest):
        if self._closed:
            raise UnavailableError("backend is shut down")
        task = DecodeTask(request.request_id, tuple(request.prompt_token_ids), request.params,
                          request.tenant)
        began = time.perf_counter()
        num_tokens = 0
        final: DecodeStep | None = None
        async with contextlib.aclosing(self.worker.generate(task)) as steps:  # closed here:
            async for step in steps:                                      # aborted there
                if step.finish_reason is not None:
                    final = step
                    break
                num_tokens += 1
                yield TokenEvent((step.token_id,))
        assert final is not None, "a decode worker's stream ends with its final step"
        instance = self.worker.instance_id
        yield FinalEvent(final.finish_reason, final.first_token_s * 1e3 or
                         (time.perf_counter() - began) * 1e3, instance, instance,
                         len(request.prompt_token_ids), final.num_cached_tokens, num_tokens,
                         request.request_id, cached_tokens_by_tier=dict(
                             final.cached_tokens_by_tier), stage_ms=dict(final.stage_ms))

    async def healthy(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._closed = True
        await self.worker.close()
