"""The decode worker for ``config.engine.kind``: the one place that tells engines apart."""

from __future__ import annotations

from decode_worker.base import DecodeWorkerBase
from kvcluster.common.config import ClusterConfig


def build_decode_worker(config: ClusterConfig, instance_id: str) -> DecodeWorkerBase:
    """Raises: ValueError for an engine kind with no decode worker."""
    kind = config.engine.kind
    if kind == "native":
        from decode_worker.worker import DecodeWorker

        return DecodeWorker(config, instance_id)
    if kind == "vllm":  # imports vLLM: only where it is configured
        from decode_worker.vllm_worker import VLLMDecodeWorker

        return VLLMDecodeWorker(config, instance_id)
    raise ValueError(f"engine.kind {kind!r} has no decode worker")
