"""SenderPool: one KVSender per decode instance, for whatever streams a prefill's KV.

Both places that send a prefill's KV use it: the native prefill worker (in its Ray
actor) and the vLLM connector's PD sender (in vLLM's worker process). Each sender is
built once per target (its gRPC channels and data plane live as long as the pool),
with the levels the transfer config names, the cluster secret, and the pace
``transfer.sender_pace_bits_per_s`` when it is set.
"""

from __future__ import annotations

from kvcluster.common.config import ClusterConfig
from kvcluster.observability.metrics import TransferMetrics
from kvcluster.transfer.security import ChannelSecurity
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.token_bucket import TokenBucketShaper
from kvstore.codec.factory import sender_levels

PACE_BURST_BYTES = 64 << 10
"""Token-bucket depth of a paced sender: a few messages ahead of the rate."""


class SenderPool:
    def __init__(self, config: ClusterConfig, metrics: TransferMetrics | None = None):
        self.config = config
        self.levels = sender_levels(config.transfer.best_level, config.transfer.policy,
                                    config.codec)
        self.security = ChannelSecurity.internal(config.security)
        """What these senders present to decode workers: the cluster secret."""
        self.metrics = metrics
        self._senders: dict[str, KVSender] = {}

    def sender(self, target: str) -> KVSender:
        """The sender to ``target`` (``host:port`` of a decode instance's receiver)."""
        if target not in self._senders:
            pace = self.config.transfer.sender_pace_bits_per_s
            shaper = TokenBucketShaper(pace, burst_bytes=PACE_BURST_BYTES) if pace else None
            self._senders[target] = KVSender(target, self.levels, self.config.transfer,
                                             security=self.security, shaper=shaper,
                                             metrics=self.metrics)
        return self._senders[target]

    def data_plane_counts(self) -> dict[str, int]:
        """Transfers per data plane, over every target."""
        counts: dict[str, int] = {}
        for sender in self._senders.values():
            for plane, n in sender.data_planes.used.items():
                counts[plane] = counts.get(plane, 0) + n
        return counts

    async def close(self) -> None:
        for sender in self._senders.values():
            await sender.close()
