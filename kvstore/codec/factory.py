"""Codecs by name, and the ordered list of bitrate levels."""

from __future__ import annotations

from typing import Sequence

from kvcluster.common.config import CodecConfig
from kvcluster.common.names import CODEC_LEVELS, check_registry
from kvcluster.transfer.levels import LevelSet
from kvstore.codec.base import KVCodec
from kvstore.codec.cachegen import CacheGenCodec
from kvstore.codec.hint import EncodeHint
from kvstore.codec.int8 import Int8Codec
from kvstore.codec.levels import LEVELS
from kvstore.codec.lossless import LosslessCodec

DEFAULT_LEVEL = "L0"
"""The smallest level that met the quality goal in bench/codec_quality.py with the encode
hint (the prefill worker's default) both on whole contexts and in 1024-token chunks
(figures in docs/benchmarks.md and docs/codec.md). ``codec.level`` overrides it."""

DEFAULT_GROUP_SIZE = CodecConfig.group_size


def get_codec(name: str, group_size: int = DEFAULT_GROUP_SIZE, transform: bool = True
              ) -> KVCodec:
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


def level_names() -> list[str]:
    """Every level, best quality first, including the two baselines."""
    return ["lossless", "int8", *(spec.name for spec in LEVELS)]


def default_level(config: CodecConfig | None = None) -> str:
    """``config.level``, or (empty, or no config) the measured default (docs/codec.md)."""
    return config.level if config is not None and config.level else DEFAULT_LEVEL


def level_set(names: Sequence[str] | None = None, config: CodecConfig | None = None
              ) -> LevelSet:
    """The transfer's :class:`LevelSet` of these codecs (every level unless ``names``)
    built as ``config`` says (group size, transform; default: ``CodecConfig()``), with
    its default level as the probe level; the codec kernels are compiled here, at
    startup, not inside the first request."""
    from kvstore.codec.native import load_all

    load_all()
    config = config or CodecConfig()
    chosen = list(names) if names is not None else level_names()
    codecs = {name: get_codec(name, config.group_size, config.transform) for name in chosen}
    return LevelSet(codecs, default_level(config),
                    hint_at=lambda position: EncodeHint(position=position))


def sender_levels(best_level: str = "", policy: str = "", config: CodecConfig | None = None
                  ) -> LevelSet:
    """The codec levels a sender may choose from, capped at ``best_level``.

    Args:
        best_level: "" for every level, "default" for the codec's default level
            (``config.level``, else the measured one), or a level name; levels
            better than it are left out.
        policy: a fixed level named by the transfer policy stays available.
        config: the ``codec`` section (level, group size, transform).

    Raises:
        ValueError: an unknown ``best_level``, or a ``config.level`` it leaves out.
    """
    names = level_names()
    cap = default_level(config) if best_level == "default" else best_level
    if cap:
        if cap not in names:
            raise ValueError(f"transfer.best_level {best_level!r}: not one of {names}")
        names = names[names.index(cap):]
    if config is not None and config.level and config.level not in names:
        raise ValueError(f"codec.level {config.level!r} is better than transfer.best_level "
                         f"{best_level!r}: the sender could never pick it")
    if policy in level_names() and policy not in names:
        names = [policy, *names]
    return level_set(names, config)


check_registry("codec levels", level_names(), CODEC_LEVELS)
