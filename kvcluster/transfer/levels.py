"""The ordered codec levels a link can use, and their quality ranks.

Quality rank: 0 for the lowest (smallest) level up to ``len(levels) - 1`` for
the best; ``"text"`` (recomputed from tokens, exact) ranks with the best.

A LevelSet also learns each level's encoded bytes per token from every chunk
encoded (or handed over encoded) at it, so that a new request's sizes are
estimated from measurements of the codec as it is now, not from constants
that a codec change would make stale.
"""

from __future__ import annotations

from typing import Callable, Mapping

from kvcluster.transfer.messages import TEXT_LEVEL

SIZE_ALPHA = 0.2
"""Weight of the newest chunk in a level's bytes-per-token average."""


class LevelSet:
    def __init__(self, codecs: Mapping[str, object], default: str | None = None,
                 hint_at: Callable[[int], object] | None = None):
        """
        Args:
            codecs: level name -> ``KVCodec``, best quality first.
            default: the codec's default level (the probe level); None: the middle one.
            hint_at: the codecs' encode hint for a chunk starting at a token position,
                used when the sender has no hint of its own; None: no hint.
        """
        if not codecs:
            raise ValueError("LevelSet needs at least one codec")
        self._codecs = dict(codecs)
        self.names: list[str] = list(codecs)
        self.default = default if default in self._codecs else self.names[len(self.names) // 2]
        self._bytes_per_token: dict[str, float] = {}
        self._hint_at = hint_at

    @property
    def best(self) -> str:
        return self.names[0]

    @property
    def lowest(self) -> str:
        return self.names[-1]

    def codec(self, name: str):
        try:
            return self._codecs[name]
        except KeyError:
            raise ValueError(f"unknown level {name!r}; known: {self.names}") from None

    def hint_at(self, position: int):
        """The default encode hint of a chunk whose first token is at ``position``."""
        return self._hint_at(position) if self._hint_at is not None else None

    def observe_size(self, name: str, num_tokens: int, num_bytes: int) -> None:
        """A chunk of ``num_tokens`` tokens was encoded at level ``name`` in ``num_bytes``."""
        if num_tokens <= 0 or name not in self._codecs:
            return
        sample = num_bytes / num_tokens
        known = self._bytes_per_token.get(name)
        # A moving average: follows a codec or content change within ~10 chunks.
        self._bytes_per_token[name] = sample if known is None else known + SIZE_ALPHA * (
            sample - known)

    def bytes_per_token(self, name: str) -> float | None:
        """Measured encoded bytes per token of level ``name``; None before any chunk."""
        return self._bytes_per_token.get(name)

    def quality(self, name: str) -> int:
        """0 (lowest level) .. len-1 (best level, or text)."""
        if name == TEXT_LEVEL:
            return len(self.names) - 1
        return len(self.names) - 1 - self.names.index(name)

    def __contains__(self, name: object) -> bool:
        return name in self._codecs

    def __len__(self) -> int:
        return len(self.names)
