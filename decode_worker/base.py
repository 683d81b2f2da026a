"""What every decode worker offers its Ray actor and the backends, whatever its engine.

    DecodeWorkerBase
      DecodeWorker       (decode_worker.worker)       kvcluster's native engine
      VLLMDecodeWorker   (decode_worker.vllm_worker)  a vLLM v1 engine + kvcluster's connector

:func:`decode_worker.factory.build_decode_worker` picks one by ``config.engine.kind``;
the actor (decode_worker.actor) and the in-process backend only use this interface.
"""

from __future__ import annotations

import abc
from typing import AsyncIterator

from prometheus_client import CollectorRegistry

from kvcluster.common.events import KVEventBatch
from kvcluster.common.tasks import DecodeStep, DecodeTask
from router.load import InstanceLoad


class DecodeWorkerBase(abc.ABC):
    instance_id: str

    @abc.abstractmethod
    async def start(self, kv_events_publish: str = "") -> str:
        """Load what is not loaded yet; returns the KV receiver's ``host:port`` ("" when
        this worker receives no KV streams). Idempotent.

        Args:
            kv_events_publish: a ZMQ address the front end's subscriber bound, for
                engines that publish their KV events themselves (vLLM); "" otherwise.
        """

    @abc.abstractmethod
    def generate(self, task: DecodeTask) -> AsyncIterator[DecodeStep]:
        """One ``DecodeStep`` per sampled token, then one final summary step.
        Closing the iterator early aborts the request in the engine.

        Raises:
            OverloadedError: ``workers.max_queue`` requests are already active.
            InvalidRequestError: the prompt does not fit this worker's engine.
        """

    @abc.abstractmethod
    def abandon_kv(self, request_id: str) -> None:
        """The request's sender is gone before streaming: stop waiting for its KV."""

    @abc.abstractmethod
    def load(self) -> InstanceLoad:
        """This instance's load, for the router's heartbeat."""

    @abc.abstractmethod
    def info(self) -> dict:
        """What the front end hashes with: ``model_id``, ``block_size``, ``layout``,
        ``engine`` (the engine kind)."""

    @abc.abstractmethod
    def registries(self) -> list[CollectorRegistry]:
        """Prometheus registries this process serves on its /metrics."""

    @abc.abstractmethod
    def take_event_batches(self, resync: bool) -> list[KVEventBatch]:
        """KV event batches queued for the front end to relay (embedded default)."""

    @abc.abstractmethod
    async def stats(self) -> dict:
        """Per-tier usage and hits, the data plane, for ``kvcluster status``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the engine and release everything it holds (processes included)."""
