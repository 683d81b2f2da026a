"""CacheGen-style KV codec: anchor/delta, sensitivity-driven bit allocation, entropy coding."""

from kvstore.codec.base import CodecError, KVCodec
from kvstore.codec.factory import default_level, get_codec, level_names, level_set, sender_levels
from kvstore.codec.hint import EncodeHint, chunk_hints

__all__ = ["CodecError", "EncodeHint", "KVCodec", "chunk_hints", "default_level", "get_codec",
           "level_names", "level_set", "sender_levels"]
