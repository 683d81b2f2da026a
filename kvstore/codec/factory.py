"""Codecs by name, and the ordered list of bitrate levels."""

from __future__ import annotations

from typing import Sequence

from kvcluster.common.config import CodecConfig
from kvcluster.transfer.levels import LevelSet
from kvstore.codec.base import KVCodec
from kvstore.codec.cachegen import CacheGenCodec
from kvstore.codec.hint import EncodeHint
from kvstore.codec.int8 import Int8Codec
from kvstore.codec.levels import LEVELS
from kvstore.codec.lossless import LosslessCodec

DEFAULT_LEVEL = "L0"
"""The smallest level that met the quality goal in bench/codec_quality.py with the encode
hint (the prefill worker's default) both on whole contexts and in 1024-token chunks:
1.98 / 1.99 bits/element, 4.08x / 4.06x smaller than int8 (L1 + hint met it in chunks
only). Without a hint L0 is 2.61 bits (docs/codec.md)."""


def get_codec(name: str, group_size: int = 10, transform: bool = True) -> KVCodec:
    """The codec of a level name ("lossless", "int8", "L0".."L6"); ``transform``: whether
    the levels code in the model profile's transform coordinates (when it has them).

    Raises:
        ValueError: unknown name.
    """
    if name == "lossless":
        return LosslessCodec()
    if name == "int8":
        return Int8Codec()
    for index, spec in enumerate(LEVELS):
        if spec.name == name:
            return CacheGenCodec(spec, index, group_size, transform)
    raise ValueError(f"unknown codec level {name!r}; known: {level_names()}")


def codec_from_config(config: CodecConfig) -> KVCodec:
    """The configured level (``config.level``, or the default) with its group size."""
    return get_codec(config.level or default_level(), config.group_size, config.transform)


def level_names() -> list[str]:
    """Every level, best quality first, including the two baselines."""
    return ["lossless", "int8", *(spec.name for spec in LEVELS)]


def default_level() -> str:
    """The measured default level (see docs/codec.md)."""
    return DEFAULT_LEVEL


def level_set(names: Sequence[str] | None = None, transform: bool = True) -> LevelSet:
    """The transfer's :class:`LevelSet` of these codecs (every level unless ``names``),
    with the default level as its probe level; the codec kernels are compiled here, at
    startup, not inside the first request."""
    from kvstore.codec.native import load_all

    load_all()
    chosen = list(names) if names is not None else level_names()
    return LevelSet({name: get_codec(name, transform=transform) for name in chosen},
                    default_level(), hint_at=lambda position: EncodeHint(position=position))


def sender_levels(best_level: str = "", policy: str = "", transform: bool = True) -> LevelSet:
    """The codec levels a sender may choose from, capped at ``best_level``.

    Args:
        best_level: "" for every level, "default" for the codec's default level,
            or a level name; levels better than it are left out.
        policy: a fixed level named by the transfer policy stays available.
        transform: ``codec.transform`` (kvstore/codec/transform.py).
    """
    names = level_names()
    cap = default_level() if best_level == "default" else best_level
    if cap:
        if cap not in names:
            raise ValueError(f"transfer.best_level {best_level!r}: not one of {names}")
        names = names[names.index(cap):]
    if policy in level_names() and policy not in names:
        names = [policy, *names]
    return level_set(names, transform)
