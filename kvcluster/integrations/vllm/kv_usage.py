"""KVUsage: vLLM's own KV cache usage, kept for the router's load heartbeat.

vLLM's scheduler reports the fraction of its KV blocks in use with every batch of
outputs (``SchedulerStats.kv_cache_usage``) to the engine's stat loggers; this one keeps
the latest value on the caller's side of AsyncLLM.
"""

from __future__ import annotations

from vllm.v1.metrics.loggers import StatLoggerBase


class KVUsage(StatLoggerBase):
    def __init__(self, vllm_config=None, engine_index: int = 0):
        self.fraction = 0.0
        """Of vLLM's KV blocks, the share in use (0..1) at its last reported step."""

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.fraction = float(scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self) -> None:
        return

    def factory(self):
        """A StatLoggerFactory that hands vLLM this very logger."""
        return lambda vllm_config, engine_index=0: self
