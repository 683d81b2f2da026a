"""The config accepts a name exactly when the registry behind the field implements it.

Each case pairs a config field with the registry's own answer (build the part by that
name; ValueError means unknown), asked of every name either side knows plus a few
that nobody should accept.
"""

from __future__ import annotations

import pytest

from kvcluster.common.config import ClusterConfig, ConfigError, from_dict
from kvcluster.common.layout import KVLayout
from kvcluster.engine.dtypes import TORCH_DTYPES, torch_dtype
from kvcluster.transfer.policy import make_policy as make_transfer_policy
from kvstore.chunk_spec import ChunkSpec
from kvstore.codec.factory import get_codec, level_names, sender_levels
from kvstore.policy import POLICIES as EVICTION_POLICIES
from kvstore.policy import make_policy as make_eviction_policy
from kvstore.tiers.disk import DiskTier
from router.policies import POLICIES as ROUTING_POLICIES
from router.policies import make_policy as make_routing_policy

BOGUS = ("", "L9", "Lx", "l0", "nope", "LRU", "float64")


def _nested(field: str, value: str) -> dict:
    data: dict = {}
    node = data
    *parents, leaf = field.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return data


def _config_accepts(field: str, value: str) -> bool:
    try:
        from_dict(ClusterConfig, _nested(field, value))
    except ConfigError as exc:
        assert exc.path == field, exc
        return False
    return True


def _builds(build, name: str) -> bool:
    try:
        build(name)
    except ValueError:
        return False
    return True


def _disk_tier(tmp_path):
    spec = ChunkSpec(KVLayout(1, 1, 4, 4, "float32"), 4)

    def build(name):
        tier = DiskTier(spec, 1 << 20, make_eviction_policy("lru", 8), compression=name,
                        directory=tmp_path / name, max_pending_writes=1, writer_threads=1,
                        reader_threads=1)
        tier.close()
    return build


def _routing(name):
    from kvcluster.common.config import RouterConfig

    make_routing_policy(RouterConfig(policy=name))


CASES = {
    # config field: (registry's names, does the registry build this name?)
    "model.dtype": (lambda: list(TORCH_DTYPES), lambda _: lambda n: torch_dtype(n)),
    "store.host.policy": (lambda: list(EVICTION_POLICIES),
                          lambda _: lambda n: make_eviction_policy(n, 8)),
    "store.disk.compression": (lambda: ["none", "zstd"], _disk_tier),
    "codec.level": (level_names, lambda _: lambda n: get_codec(n)),
    "transfer.policy": (lambda: ["adaptive", "recompute", "lowest", "best", *level_names()],
                        lambda _: lambda n: make_transfer_policy(n, level_names())),
    "transfer.best_level": (lambda: ["default", *level_names()],
                            lambda _: lambda n: sender_levels(n)),
    "router.policy": (lambda: list(ROUTING_POLICIES), lambda _: _routing),
}


@pytest.mark.parametrize("field", sorted(CASES))
def test_config_accepts_exactly_what_the_registry_builds(field, tmp_path):
    known, builder = CASES[field]
    build = builder(tmp_path)
    for name in sorted({*known(), *BOGUS} - {""}):
        assert _config_accepts(field, name) == _builds(build, name), (field, name)


def test_codec_level_must_be_a_real_level():
    assert _config_accepts("codec.level", "")           # empty: the measured default
    for name in ("L9", "L", "Lossy", "L-1"):
        assert not _config_accepts("codec.level", name), name


def test_probe_level_must_be_a_real_level():
    assert _config_accepts("transfer.probe_level", "")  # empty: codec.level
    for name in level_names():
        assert _config_accepts("transfer.probe_level", name)
    assert not _config_accepts("transfer.probe_level", "L9")


def test_codec_level_better_than_best_level_is_refused():
    data = {"codec": {"level": "L0"}, "transfer": {"best_level": "L3"}}
    with pytest.raises(ConfigError) as info:
        from_dict(ClusterConfig, data)
    assert info.value.path == "codec.level" and "best_level" in str(info.value)
    from_dict(ClusterConfig, {"codec": {"level": "L3"}, "transfer": {"best_level": "L0"}})
