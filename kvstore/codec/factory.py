"""Codecs by name, and the ordered list of bitrate levels."""

from __future__ import annotations

from kvstore.codec.base import KVCodec


def get_codec(name: str) -> KVCodec:
    """The codec of a level name ("lossless", "int8", "L0".."Ln")."""
    raise NotImplementedError


def level_names() -> list[str]:
    """Every level, best quality first, including the two baselines."""
    raise NotImplementedError


def default_level() -> str:
    """The measured default level (see docs/codec.md)."""
    raise NotImplementedError
