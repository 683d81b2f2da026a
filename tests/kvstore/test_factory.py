"""build_store from the cluster config's store section."""

import pytest
import torch

from kvcluster.common.config import ClusterConfig, ConfigError, from_dict
from kvcluster.common.events import Tier
from kvstore import build_store
from tests.kvstore.helpers import CHUNK, LAYOUT, make_keys, make_kv


def test_build_store_from_yaml_like_config(tmp_path):
    config = from_dict(ClusterConfig, {
        "engine": {"block_size": 4},
        "store": {
            "chunk_tokens": 8,
            "device": {"capacity_bytes": 2 * CHUNK},
            "host": {"capacity_bytes": 3 * CHUNK, "policy": "s3fifo"},
            "disk": {"enabled": True, "directory": str(tmp_path), "capacity_bytes": 1 << 20,
                     "compression": "zstd", "max_pending_writes": 2, "writer_threads": 1},
        },
    })
    store = build_store(config.store, LAYOUT, model_id="tiny")
    assert [t.kind for t in store.tiers] == [Tier.DEVICE, Tier.HOST, Tier.DISK]
    assert type(store.tiers[1].policy).__name__ == "S3FIFOPolicy"
    assert store.tiers[0].num_slots == 2 and store.tiers[2].compression == "zstd"
    keys, kv = make_keys(6), make_kv(6)
    store.put(keys, kv)
    store.flush()
    assert store.lookup(keys).tiers == [Tier.DISK] + [Tier.HOST] * 3 + [Tier.DEVICE] * 2
    assert torch.equal(store.get(keys), kv)
    store.close()


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="store.disk.writer_threads"):
        from_dict(ClusterConfig, {"store": {"disk": {"writer_threads": 0}}})
    with pytest.raises(ConfigError, match="store.host.policy"):
        from_dict(ClusterConfig, {"store": {"host": {"policy": "mru"}}})


def test_all_tiers_disabled_is_an_error():
    config = from_dict(ClusterConfig, {"store": {"device": {"enabled": False},
                                                 "host": {"enabled": False}}})
    with pytest.raises(ValueError, match="every tier is disabled"):
        build_store(config.store, LAYOUT)
