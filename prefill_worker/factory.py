"""The prefill worker for ``config.engine.kind``: the one place that tells engines apart."""

from __future__ import annotations

from kvcluster.common.config import ClusterConfig


def build_prefill_worker(config: ClusterConfig, instance_id: str):
    """The native :class:`~prefill_worker.worker.PrefillWorker` or a
    :class:`~prefill_worker.vllm_worker.VLLMPrefillWorker`; both offer start, prefill,
    load, info, registries, take_event_batches, stats and close.

    Raises: ValueError for an engine kind with no prefill worker."""
    kind = config.engine.kind
    if kind == "native":
        from prefill_worker.worker import PrefillWorker

        return PrefillWorker(config, instance_id)
    if kind == "vllm":  # imports vLLM: only where it is configured
        from prefill_worker.vllm_worker import VLLMPrefillWorker

        return VLLMPrefillWorker(config, instance_id)
    raise ValueError(f"engine.kind {kind!r} has no prefill worker")
