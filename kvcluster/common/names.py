"""The names a config may choose for each pluggable part, declared once.

``kvcluster.common`` must not import the packages that implement these parts
(kvstore, router, the transfer), yet the config has to reject a name no
registry knows when the YAML is loaded, not at the first request. So the names
live here: ``config.py`` validates against them, and each registry checks at
import that it implements exactly them (:func:`check_registry`); adding a part
means adding its name here, or its package refuses to import.

Dtype names are :data:`kvcluster.common.layout.DTYPE_SIZES`' keys.
"""

from __future__ import annotations

from typing import Iterable, Sequence

EVICTION_POLICIES = ("lru", "s3fifo")
"""kvstore.policy.POLICIES."""

DISK_COMPRESSIONS = ("none", "zstd")
"""kvstore.tiers.disk.DiskTier's ``compression``."""

CODEC_LEVELS = ("lossless", "int8", "L0", "L1", "L2", "L3", "L4", "L5", "L6")
"""kvstore.codec.factory.level_names(): the two baselines, then the CacheGen levels
(kvstore/codec/levels.py), best quality first."""

TRANSFER_POLICIES = ("adaptive", "recompute", "lowest", "best")
"""kvcluster.transfer.policy.make_policy's names; any of :data:`CODEC_LEVELS` also
names a policy (always that level)."""

ROUTING_POLICIES = ("kv_aware", "round_robin", "least_loaded", "prefix_only")
"""router.policies.POLICIES."""


def check_registry(kind: str, implemented: Iterable[str], declared: Sequence[str]) -> None:
    """Refuse (at import) a registry whose names differ from the declared ones.

    Raises:
        RuntimeError: the two lists differ (in members or order).
    """
    implemented = tuple(implemented)
    if implemented != tuple(declared):
        raise RuntimeError(f"{kind}: the registry implements {list(implemented)} but "
                           f"kvcluster.common.names declares {list(declared)}; keep them equal")
