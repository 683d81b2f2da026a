"""The sending end: a pool of channels to one receiver and a policy per link.

    async with KVSender("127.0.0.1:50070", levels, config) as sender:
        result = await sender.send(source, "req-1", slo_ms=500)

Requests are spread over ``config.num_channels`` connections (one HTTP/2
stream each), so several requests move in parallel. The bandwidth estimate
lives as long as the sender: the first chunk ever sent is the probe, later
requests start from what earlier ones measured.
"""

from __future__ import annotations

import asyncio
import itertools

import grpc

from kvcluster.common.config import TransferConfig
from kvcluster.observability.metrics import TransferMetrics
from kvcluster.proto import convert
from kvcluster.transfer.bandwidth import BandwidthEstimator
from kvcluster.transfer.data_plane.factory import SenderDataPlanes
from kvcluster.transfer.heap import keep_heap_warm
from kvcluster.transfer.levels import LevelSet
from kvcluster.transfer.messages import ReceiverInfo
from kvcluster.transfer.policy import LevelPolicy, make_policy
from kvcluster.transfer.security import ChannelSecurity
from kvcluster.transfer.server import INFO_METHOD, STREAM_METHOD, channel_options
from kvcluster.transfer.shaper import Shaper
from kvcluster.transfer.source import ChunkSource
from kvcluster.transfer.stream_writer import (
    BeforeChunk,
    PayloadFilter,
    SendResult,
    StreamOptions,
    StreamWriter,
)


class KVSender:
    def __init__(self, target: str, levels: LevelSet, config: TransferConfig | None = None,
                 policy: LevelPolicy | None = None, security: ChannelSecurity | None = None,
                 shaper: Shaper | None = None, estimator: BandwidthEstimator | None = None,
                 metrics: TransferMetrics | None = None):
        """
        Args:
            target: the receiver's ``host:port``.
            policy: default: ``config.policy`` over ``levels``.
            shaper: bandwidth limit for benchmarks; default none.
            metrics: Prometheus families to record each stream in; default none.
            security: what to present (default: nothing, plaintext); workers pass
                ``ChannelSecurity.internal(config.security)``.
        """
        self.metrics = metrics
        self.target = target
        self.levels = levels
        self.config = config or TransferConfig()
        self.policy = policy or make_policy(
            self.config.policy, levels.names, self.config.probe_level or levels.default,
            self.config.bandwidth_safety, self.config.slo_risk)
        self.security = security or ChannelSecurity()
        self.shaper = shaper
        self.estimator = estimator or BandwidthEstimator(self.config.bandwidth_alpha,
                                                         self.config.bandwidth_window)
        if self.config.heap_trim_threshold_bytes:
            keep_heap_warm(self.config.heap_trim_threshold_bytes)
        self.data_planes = SenderDataPlanes(self.config, self.security)
        """Payload bytes beside the stream (``config.data_plane``); counts per plane."""
        self._channels = [self._channel(i) for i in range(self.config.num_channels)]
        self._next_channel = itertools.cycle(range(len(self._channels)))
        self._info: ReceiverInfo | None = None

    async def __aenter__(self) -> "KVSender":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        await self.data_planes.close()

    async def receiver_info(self, refresh: bool = False) -> ReceiverInfo:
        """Layout, levels and recompute speed of the receiver (cached)."""
        if self._info is None or refresh:
            call = self._channels[0].unary_unary(
                INFO_METHOD, request_serializer=lambda _: b"",
                response_deserializer=convert.decode_info)
            self._info = await call(None, metadata=self.security.metadata(),
                                    timeout=self.config.timeout_s)
        return self._info

    async def send(self, source: ChunkSource, request_id: str, slo_ms: float | None = None,
                   before_chunk: BeforeChunk | None = None,
                   payload_filter: PayloadFilter | None = None) -> SendResult:
        """Stream one request's KV; returns when the receiver reports its final status.

        Args:
            slo_ms: deadline the policy plans for; default ``config.slo_ms``.
            before_chunk: hook called before each chunk's level is chosen.
            payload_filter: fault injection (tests): rewrites a part after its checksum.
        """
        info = await self.receiver_info()
        options = StreamOptions(slo_ms or self.config.slo_ms, before_chunk, payload_filter)
        call = self._stream_call()(metadata=self.security.metadata(),
                                   timeout=self.config.timeout_s)
        writer = StreamWriter(call, request_id, source, self.policy, self.estimator, info,
                              self.config, options, self.shaper, self.data_planes,
                              self.target.rpartition(":")[0].strip("[]"))
        try:
            result = await writer.run()
        except (grpc.aio.AioRpcError, ConnectionError, asyncio.InvalidStateError) as exc:
            call.cancel()
            writer.result.error = _describe(exc)
            self._observe(source, writer.result)
            return writer.result
        except BaseException:  # cancelled: tell the receiver now, not at the deadline
            call.cancel()
            raise
        if result.status is not None:
            self._info = info.updated(result.status)
        self._observe(source, result)
        return result

    # ------------------------------------------------------------ helpers

    def _observe(self, source: ChunkSource, result: SendResult) -> None:
        """Chunks and payload bytes by the level each chunk was last sent at."""
        if self.metrics is None:
            return
        ok = result.status is not None and result.status.ok
        sizes = ((level, len(source.payload(i, level)) if source.has_payload(i, level) else 0)
                 for i, level in enumerate(result.levels) if level)
        self.metrics.observe_send(ok, result.elapsed_s, sizes)

    def _stream_call(self):
        channel = self._channels[next(self._next_channel)]
        return channel.stream_stream(
            STREAM_METHOD, request_serializer=convert.encode_sender_message,
            response_deserializer=convert.decode_receiver_message)

    def _channel(self, number: int) -> grpc.aio.Channel:
        # A distinct channel_id and a local subchannel pool: one TCP connection each.
        options = [*channel_options(self.config), ("grpc.use_local_subchannel_pool", 1),
                   ("grpc.channel_id", number), *self.security.channel_options()]
        if self.security.tls:
            return grpc.aio.secure_channel(self.target, self.security.credentials(), options)
        return grpc.aio.insecure_channel(self.target, options)


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
