"""Codecs by name, and the ordered list of bitrate levels."""

from __future__ import annotations

from kvcluster.common.config import CodecConfig
from kvstore.codec.base import KVCodec
from kvstore.codec.cachegen import CacheGenCodec
from kvstore.codec.int8 import Int8Codec
from kvstore.codec.levels import LEVELS
from kvstore.codec.lossless import LosslessCodec

DEFAULT_LEVEL = "L0"
"""The smallest level that met the quality goal in bench/codec_quality.py both on whole
contexts and in 1024-token chunks (L1 met it on whole contexts only; docs/codec.md),
with or without an encode hint (with one: 2.63 instead of 3.29 bits/element)."""


def get_codec(name: str, group_size: int = 10) -> KVCodec:
    """The codec of a level name ("lossless", "int8", "L0".."L6").

    Raises:
        ValueError: unknown name.
    """
    if name == "lossless":
        return LosslessCodec()
    if name == "int8":
        return Int8Codec()
    for index, spec in enumerate(LEVELS):
        if spec.name == name:
            return CacheGenCodec(spec, index, group_size)
    raise ValueError(f"unknown codec level {name!r}; known: {level_names()}")


def codec_from_config(config: CodecConfig) -> KVCodec:
    """The configured level (``config.level``, or the default) with its group size."""
    return get_codec(config.level or default_level(), config.group_size)


def level_names() -> list[str]:
    """Every level, best quality first, including the two baselines."""
    return ["lossless", "int8", *(spec.name for spec in LEVELS)]


def default_level() -> str:
    """The measured default level (see docs/codec.md)."""
    return DEFAULT_LEVEL
