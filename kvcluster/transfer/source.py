"""The sender's view of one request: its chunks, their tokens and encoded bytes.

Built either from a KV tensor (each level is encoded on first use and cached;
sizes of levels not yet encoded are estimated from the bytes per token the
LevelSet has measured, across requests) or from bytes encoded in advance (what
a kvstore holding every level, as CacheGen stores them, would hand over).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from kvcluster.common.layout import KVLayout
from kvcluster.transfer.levels import LevelSet
from kvcluster.transfer.messages import TEXT_LEVEL, frame_checksum


@dataclass(frozen=True)
class ChunkSpec:
    index: int
    token_start: int
    token_end: int

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


class ChunkSource:
    def __init__(self, token_ids: Sequence[int], layout: KVLayout, levels: LevelSet,
                 chunk_tokens: int, kv=None, hints: Sequence[object] = ()):
        """
        Args:
            token_ids: every token of the request.
            kv: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` or None when
                every chunk is handed over encoded (:meth:`add_encoded`).
            hints: optional encode hint per chunk (kvstore.codec.chunk_hints).
        """
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        if kv is not None and tuple(kv.shape) != layout.shape(len(token_ids)):
            raise ValueError(f"kv shape {tuple(kv.shape)} != {layout.shape(len(token_ids))}")
        self.token_ids = tuple(int(t) for t in token_ids)
        self.layout = layout
        self.levels = levels
        self.kv = kv
        self.chunk_tokens = chunk_tokens
        self.specs = _split(len(self.token_ids), chunk_tokens)
        if hints and len(hints) != len(self.specs):
            raise ValueError(f"{len(hints)} hints for {len(self.specs)} chunks")
        self.hints = tuple(hints)
        self._encoded: dict[tuple[int, str], bytes] = {}
        self._checksums: dict[tuple[int, str], int] = {}

    @property
    def num_chunks(self) -> int:
        return len(self.specs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def chunk_token_ids(self, index: int) -> tuple[int, ...]:
        spec = self.specs[index]
        return self.token_ids[spec.token_start:spec.token_end]

    def has_payload(self, index: int, level: str) -> bool:
        return level == TEXT_LEVEL or (index, level) in self._encoded

    def add_encoded(self, index: int, level: str, data: bytes) -> None:
        self._encoded[(index, level)] = data
        self.levels.observe_size(level, self.specs[index].num_tokens, len(data))

    def encode_all(self, levels: Sequence[str] | None = None) -> None:
        """Encode every chunk at every level now (off the critical path)."""
        for index in range(self.num_chunks):
            for level in levels or self.levels.names:
                self.payload(index, level)

    def payload(self, index: int, level: str) -> bytes:
        """Encoded bytes of chunk ``index`` at ``level`` (empty for text)."""
        if level == TEXT_LEVEL:
            return b""
        key = (index, level)
        if key not in self._encoded:
            self.add_encoded(index, level, self._encode(index, level))
        return self._encoded[key]

    def checksum(self, index: int, level: str) -> int:
        """XXH3-64 of the whole encoded chunk (what a data-plane chunk carries), once
        per (chunk, level): a re-sent or re-sent-elsewhere chunk is not hashed again."""
        key = (index, level)
        if key not in self._checksums:
            self._checksums[key] = frame_checksum(self.payload(index, level))
        return self._checksums[key]

    def estimated_bytes(self, index: int, level: str) -> int:
        """Exact if already encoded; else the level's measured bytes per token (this
        process, every request); else the raw size (see :meth:`measure_sizes`)."""
        if level == TEXT_LEVEL:
            return 4 * self.specs[index].num_tokens
        if (index, level) in self._encoded:
            return len(self._encoded[(index, level)])
        num_tokens = self.specs[index].num_tokens
        per_token = self.levels.bytes_per_token(level)
        if per_token is not None:
            return int(per_token * num_tokens)
        return self.layout.bytes_per_chunk(num_tokens)

    def unmeasured_levels(self, index: int) -> list[str]:
        """Levels this chunk could be encoded at whose size is not known yet."""
        if self.kv is None:
            return []
        return [level for level in self.levels.names
                if (index, level) not in self._encoded and self.levels.bytes_per_token(level) is None]

    def measure_sizes(self, index: int) -> None:
        """Encode chunk ``index`` at every unmeasured level (kept, in case it is sent).

        Once per level and process (the LevelSet remembers). Each costs a whole
        chunk's encode (docs/transfer.md, "Measurements behind the code"), so
        callers on an event loop run it in a thread.
        """
        for level in self.unmeasured_levels(index):
            self.payload(index, level)

    def bytes_by_level(self, index: int) -> Mapping[str, int]:
        return {level: self.estimated_bytes(index, level) for level in self.levels.names}

    def _encode(self, index: int, level: str) -> bytes:
        if self.kv is None:
            raise KeyError(f"chunk {index} at level {level!r} was not handed over encoded")
        spec = self.specs[index]
        chunk = self.kv[:, :, spec.token_start:spec.token_end].contiguous()
        hint = self.hints[index] if self.hints else self.levels.hint_at(spec.token_start)
        return self.levels.codec(level).encode(chunk, self.layout, hint)


def _split(num_tokens: int, chunk_tokens: int) -> list[ChunkSpec]:
    starts = range(0, num_tokens, chunk_tokens)
    return [ChunkSpec(i, s, min(s + chunk_tokens, num_tokens)) for i, s in enumerate(starts)]
