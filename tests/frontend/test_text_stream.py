"""Text deltas and stop strings over the tiny byte-level tokenizer (token id = byte)."""

from __future__ import annotations

from kvcluster.server.frontend_text import TextStream


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def test_deltas_rebuild_the_text_and_never_split_a_character(tokenizer):
    text = "héllo wörld ✓"
    stream = TextStream(tokenizer)
    deltas = [stream.push([t]) for t in _ids(tokenizer, text)] + [stream.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    check = TextStream(tokenizer)
    assert [check.push([t]) for t in _ids(tokenizer, "✓")] == ["", "", "✓"]  # 3 bytes, 1 char


def test_stop_string_is_cut_and_never_partly_sent(tokenizer):
    stream = TextStream(tokenizer, stop=("END",))
    sent = []
    for t in _ids(tokenizer, "abc ENxEND tail"):
        sent.append(stream.push([t]))
        if stream.stopped:
            break
    assert "".join(sent) == "abc ENx"
    assert stream.stopped and stream.flush() == ""
    # "EN" was held back until "x" proved it was not the stop string
    assert sent[:6] == ["a", "b", "c", " ", "", ""] and sent[6] == "ENx"


def test_earliest_of_several_stops_wins_and_flush_releases_held_text(tokenizer):
    stream = TextStream(tokenizer, stop=("zz", "b"))
    assert stream.push(_ids(tokenizer, "aab")) == "aa" and stream.stopped
    held = TextStream(tokenizer, stop=("xyz",))
    assert held.push(_ids(tokenizer, "hixy")) == "hi"
    assert held.flush() == "xy" and not held.stopped
