import pytest

from kvstore.codec.factory import default_level, level_names, sender_levels


def test_default_caps_at_the_codec_default_level():
    names = sender_levels("default").names
    assert names[0] == default_level()
    assert names == level_names()[level_names().index(default_level()):]
    assert "lossless" not in names


def test_empty_allows_every_level_and_fixed_policy_stays():
    assert sender_levels("").names == level_names()
    names = sender_levels("default", policy="lossless").names
    assert names[0] == "lossless" and default_level() in names


def test_unknown_level_is_a_clear_error():
    with pytest.raises(ValueError, match="best_level"):
        sender_levels("L99")


def test_codec_level_is_the_default_cap_and_probe():
    from kvcluster.common.config import CodecConfig

    levels = sender_levels("default", config=CodecConfig(level="L4"))
    assert levels.names == level_names()[level_names().index("L4"):]
    assert levels.default == "L4"
    everything = sender_levels("", config=CodecConfig(level="L4"))
    assert everything.names == level_names() and everything.default == "L4"
    with pytest.raises(ValueError, match="codec.level"):
        sender_levels("L5", config=CodecConfig(level="L4"))


def test_group_size_reaches_every_level_codec():
    import torch

    from kvcluster.common.config import CodecConfig
    from kvcluster.common.layout import KVLayout
    from kvstore.codec.stream import unpack_stream

    layout = KVLayout(2, 2, 16, 4, "float16")
    kv = torch.randn(layout.shape(24)).half()
    levels = sender_levels("", config=CodecConfig(group_size=7, transform=False))
    for name in levels.names[2:]:
        codec = levels.codec(name)
        assert unpack_stream(codec.encode(kv, layout), layout, codec.codec_id).group_size == 7
