"""CacheGen-style KV codec: anchor/delta, layer-group quantization, entropy coding."""

from kvstore.codec.base import CodecError, KVCodec
from kvstore.codec.factory import default_level, get_codec, level_names

__all__ = ["CodecError", "KVCodec", "default_level", "get_codec", "level_names"]
