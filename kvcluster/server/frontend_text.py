"""Token ids -> text deltas for the stream, with stop strings matched in the text.

Text that might be the start of a stop string is held back until it is known
not to be one, so the client never sees any part of a stop string:

    text so far:  ...................... | held: a tail that begins a stop string |
                  already sent                not sent yet
"""

from __future__ import annotations

from kvcluster.engine.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self._decoder = tokenizer.stream_decoder()
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._pending = ""
        self.stopped = False
        """True once a stop string matched; later tokens must not be sent."""

    def push(self, token_ids) -> str:
        """Text newly safe to send after ``token_ids`` (may be "")."""
        return self._release("".join(self._decoder.push(t) for t in token_ids))

    def flush(self) -> str:
        """Everything still held at the end of the stream (unless a stop string matched)."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.flush()
        self._pending = ""
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return text[:cut]
        return text

    def _release(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self._pending + delta
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        keep = self._partial_stop_len(text)
        self._pending = text[len(text) - keep:]
        return text[: len(text) - keep]

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        for k in range(min(self._hold, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self._stop):
                return k
        return 0

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None
