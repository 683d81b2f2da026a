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
