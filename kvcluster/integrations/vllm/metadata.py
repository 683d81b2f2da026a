"""What the connector's two halves tell each other, and the settings both read.

    scheduler half --ConnectorMeta (per step)--> worker half
    worker half --KVClusterEvents (per step, in KVConnectorOutput)--> scheduler half

Every field is plain data (lists of ints and bytes): vLLM's multiprocess executor
pickles the metadata into the worker process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_events import KVConnectorKVEvents
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvcluster.common.config import ClusterConfig, from_dict
from kvcluster.common.event_media import KVCLUSTER_OWNERSHIP as OWNERSHIP

PD_RECV = "kvcluster_recv"
"""kv_transfer_params key (decode instance): ``{"transfer_id", "num_tokens",
"timeout_s"}``: the request's first ``num_tokens`` prompt tokens (whole store chunks)
come from a prefill instance's stream named ``transfer_id``."""
PD_SEND = "kvcluster_send"
"""kv_transfer_params key (prefill instance): ``{"transfer_id", "target", "num_tokens",
"slo_ms"}``: stream the first ``num_tokens`` prompt tokens' KV to ``target``."""
LOADED_TOKENS = "kvcluster_loaded_tokens"
"""kv_transfer_params of a finished request: tokens it loaded, by tier ("transfer":
from a prefill instance's stream)."""
RECV_WAIT_MS = "kvcluster_recv_wait_ms"
"""kv_transfer_params of a finished request: how long vLLM held it waiting for its
stream (blocks allocated -> receive finished)."""
LOST_TOKENS = "kvcluster_lost_tokens"
"""kv_transfer_params of a finished request: tokens vLLM counted as cached when it
planned the request's stream, but computed because the stream did not fill them."""

__all__ = ["OWNERSHIP", "PD_RECV", "PD_SEND", "LOADED_TOKENS", "LOST_TOKENS",
           "RECV_WAIT_MS", "ConnectorSettings",
           "LoadSpec", "SaveSpec", "RecvSpec", "SendSpec", "ConnectorMeta", "KVClusterEvents"]


@dataclass(frozen=True)
class ConnectorSettings:
    """The connector's part of ``kv_connector_extra_config``."""

    config: ClusterConfig
    instance_id: str
    model_id: str
    """ExtraKeys.model_id of every chunk key (the same the router hashes with)."""

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any]) -> "ConnectorSettings":
        """Raises: ValueError naming a missing key or a bad cluster config."""
        missing = [k for k in ("cluster_config", "instance_id", "model_id") if k not in extra]
        if missing:
            raise ValueError(f"kv_connector_extra_config lacks {missing}")
        return cls(from_dict(ClusterConfig, extra["cluster_config"]), str(extra["instance_id"]),
                   str(extra["model_id"]))

    @property
    def chunk_tokens(self) -> int:
        return self.config.store.chunk_tokens

    @property
    def hash_block_size(self) -> int:
        """Tokens per hashed block of the chunk-key chain (engine.block_size)."""
        return self.config.engine.block_size


@dataclass
class LoadSpec:
    """Copy stored chunks into a request's blocks."""

    request_id: str
    chunk_keys: list[bytes]
    """Digests of chunks ``first_chunk .. first_chunk + len - 1``."""
    first_chunk: int
    first_token: int
    """Write tokens ``[first_token, (first_chunk + len) * C)``; block-aligned."""
    block_ids: list[int]
    """vLLM blocks receiving exactly those tokens, in order."""


@dataclass
class SaveSpec:
    """Store a run of whole chunks a request computed."""

    request_id: str
    tenant: str
    chunk_keys: list[bytes]
    block_ids: list[int]
    """vLLM blocks holding the run's tokens, in order."""


@dataclass
class RecvSpec:
    """Decode instance: a request waits for its stream; write it into these blocks."""

    request_id: str
    """vLLM's (internal) request id, reported in finished_recving."""
    transfer_id: str
    """The stream's request id (the sender's)."""
    prompt_token_ids: list[int]
    """The request's tokens ``[0, end_token)``: the stream must carry these."""
    first_token: int
    end_token: int
    """Tokens ``[first_token, end_token)`` (block-aligned) come from the stream."""
    block_ids: list[int]
    timeout_s: float


@dataclass
class SendSpec:
    """Prefill instance: a request's first step opens its stream (``target`` set);
    every step that completes whole chunks hands them over (``block_ids``)."""

    request_id: str
    transfer_id: str
    first_token: int = 0
    block_ids: list[int] = field(default_factory=list)
    """vLLM blocks of tokens ``[first_token, first_token + len * B)``, to gather."""
    target: str = ""
    """host:port of the decode instance's receiver ("": the stream is open already)."""
    token_ids: list[int] = field(default_factory=list)
    """With ``target``: every token the stream carries."""
    slo_ms: float = 0.0


@dataclass
class ConnectorMeta(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    recvs: list[RecvSpec] = field(default_factory=list)
    sends: list[SendSpec] = field(default_factory=list)


class KVClusterEvents(KVConnectorKVEvents):
    """The worker's tier events of one step (vLLM BlockStored/BlockRemoved objects), in
    the order they happened. Not vLLM's KVEventAggregator: it counts events in a Counter,
    which reorders a chunk stored, removed and stored again. One worker only (the
    connector refuses tensor parallelism), so nothing needs aggregating."""

    def __init__(self, events: list | None = None) -> None:
        self._events = list(events or [])

    def add_events(self, events: list) -> None:
        self._events.extend(events)

    def aggregate(self) -> "KVClusterEvents":
        return self

    def increment_workers(self, count: int = 1) -> None:
        return

    def get_all_events(self) -> list:
        return list(self._events)

    def get_number_of_workers(self) -> int:
        return 1

    def clear_events(self) -> None:
        self._events.clear()
