"""Prometheus metrics of one store, in its own registry (no global state).

    kvstore_hits_total{tier}               chunks served by get(), by the tier they were in
    kvstore_misses_total                   requested chunks past the stored prefix
    kvstore_bytes{tier}                    bytes stored (charged) in a tier
    kvstore_capacity_bytes{tier}           a tier's byte budget
    kvstore_evictions_total{tier}          chunks evicted from a tier (spilled or dropped)
    kvstore_dropped_total                  evicted chunks that no lower tier took
    kvstore_skipped_total{tier}            chunks a put or spill sent past a tier that
                                           was not accepting (disk: every staging row
                                           busy; Redis: down)
    kvstore_promotions_total{tier}         chunks moved up to the top tier, by source tier
    kvstore_lost_total{tier,reason}        chunks a tier lost on its own (corrupt, io,
                                           expired, unavailable)
    kvstore_tier_available{tier}           1 while a tier is usable (Redis up)
    kvstore_spill_seconds{tier}            time to move one evicted chunk down from a tier
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvstore.tiers.base import StorageTier

SPILL_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.hits = Counter("kvstore_hits", "Chunks served by get()", ["tier"], registry=r)
        self.misses = Counter("kvstore_misses", "Requested chunks not stored", registry=r)
        self.bytes = Gauge("kvstore_bytes", "Bytes stored in a tier", ["tier"], registry=r)
        self.capacity = Gauge("kvstore_capacity_bytes", "Byte budget of a tier", ["tier"],
                              registry=r)
        self.available = Gauge("kvstore_tier_available", "1 while a tier is usable", ["tier"],
                               registry=r)
        self.evictions = Counter("kvstore_evictions", "Chunks evicted from a tier", ["tier"],
                                 registry=r)
        self.dropped = Counter("kvstore_dropped", "Evicted chunks no lower tier took",
                               registry=r)
        self.skipped = Counter("kvstore_skipped", "Chunks sent past a tier not accepting",
                               ["tier"], registry=r)
        self.promotions = Counter("kvstore_promotions", "Chunks promoted, by source tier",
                                  ["tier"], registry=r)
        self.lost = Counter("kvstore_lost", "Chunks lost by a tier", ["tier", "reason"],
                            registry=r)
        self.spill_seconds = Histogram("kvstore_spill_seconds", "Spill latency per chunk",
                                       ["tier"], buckets=SPILL_BUCKETS, registry=r)

    def watch(self, tier: StorageTier) -> None:
        """Export a tier's gauges, read at scrape time (nothing on the hot path)."""
        self.bytes.labels(tier.name).set_function(lambda: tier.used_bytes)
        self.capacity.labels(tier.name).set_function(lambda: tier.capacity_bytes)
        self.available.labels(tier.name).set_function(lambda: float(tier.is_up))

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (tests, benches); 0 when absent."""
        found = self.registry.get_sample_value(name, labels or None)
        return 0.0 if found is None else found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
