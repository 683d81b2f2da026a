"""The codec interface: one KV chunk in, one self-describing byte stream out.

Every codec turns a chunk ``[num_layers, 2 (K, V), num_tokens, num_kv_heads,
head_dim]`` in ``layout.dtype`` into bytes and back. Decoding validates the
whole stream (magic, version, layout fingerprint, level, sizes, checksum)
before it allocates anything; any failure raises :class:`CodecError`.
"""

from __future__ import annotations

import abc

import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec.hint import EncodeHint


class CodecError(ValueError):
    """A stream that cannot be decoded: garbage, truncated, wrong layout or bad checksum."""


class KVCodec(abc.ABC):
    """Base class of every KV codec (lossless, int8 and the bitrate levels)."""

    name: str
    """Level name carried in the stream: "lossless", "int8", "L0".."Ln"."""

    @abc.abstractmethod
    def encode(self, kv: torch.Tensor, layout: KVLayout, hint: EncodeHint | None = None) -> bytes:
        """Encode one chunk.

        Args:
            kv: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` in ``layout.dtype``.
            layout: the KV layout the chunk belongs to.
            hint: what the engine knows about the chunk (hint.py); only the level
                codecs use it, and the stream's format does not depend on it.
        Returns:
            A self-describing stream (see docs/codec.md).
        Raises:
            ValueError: bad chunk, or a hint that does not fit it.
        """

    @abc.abstractmethod
    def decode(self, data: bytes | memoryview, layout: KVLayout) -> torch.Tensor:
        """Decode a stream made by :meth:`encode` for the same layout.

        Returns:
            ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` in ``layout.dtype``.
        Raises:
            CodecError: garbage, truncated stream, other layout or level, bad checksum.
        """
