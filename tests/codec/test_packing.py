"""Symbol packing: exact round trips at every width, escapes in order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.codec import CodecError
from kvstore.codec.packing import choose_width, pack, unpack


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.integers(-127, 127), min_size=1, max_size=300), width=st.sampled_from([2, 4, 8]))
def test_pack_round_trips(values, width):
    symbols = np.array(values, dtype=np.int8)
    packed, escapes = pack(symbols, width)
    assert packed.size == -(-symbols.size * width // 8)
    limit = (1 << (width - 1)) - 1 if width < 8 else 127
    assert escapes.tolist() == [v for v in values if abs(v) > limit]
    assert np.array_equal(unpack(packed, symbols.size, width, escapes), symbols)


def test_exact_packed_bytes():
    packed, escapes = pack(np.array([0, 1, -1, 5, 2], dtype=np.int8), 2)
    # codes: 0->2, 1->3, -1->1, 5->escape 0 | 2->escape 0, padding 0->2
    assert packed.tolist() == [2 | 3 << 2 | 1 << 4 | 0 << 6, 0 | 2 << 2 | 2 << 4 | 2 << 6]
    assert escapes.tolist() == [5, 2]


def test_width_choice_follows_the_escape_share():
    assert choose_width(np.zeros(1000, dtype=np.int8)) == 2
    assert choose_width(np.full(1000, 5, dtype=np.int8)) == 4
    assert choose_width(np.full(1000, -100, dtype=np.int8)) == 8


def test_unpack_rejects_inconsistent_input():
    packed, escapes = pack(np.array([9, 0, 0, 0], dtype=np.int8), 4)
    with pytest.raises(CodecError, match="escapes"):
        unpack(packed, 4, 4, escapes[:0])
    with pytest.raises(CodecError, match="bytes"):
        unpack(packed, 9, 4, escapes)
