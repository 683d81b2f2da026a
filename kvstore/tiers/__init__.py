"""Storage tiers: one base class, one implementation per file, a factory."""

from kvstore.tiers.base import StorageTier
from kvstore.tiers.device import DeviceTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.factory import build_tiers
from kvstore.tiers.host import HostTier
from kvstore.tiers.redis_tier import RedisTier
from kvstore.tiers.slot_pool import SlotPoolTier

__all__ = ["StorageTier", "SlotPoolTier", "DeviceTier", "HostTier", "DiskTier", "RedisTier",
           "build_tiers"]
