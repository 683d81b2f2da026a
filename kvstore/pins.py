"""Reference counts of chunks in use: a pinned chunk is never evicted."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator


class PinTable:
    """digest -> count, holding only counts > 0 (so ``in`` means pinned)."""

    def __init__(self) -> None:
        self._counts: dict[bytes, int] = {}

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._counts

    def count(self, digest: bytes) -> int:
        return self._counts.get(digest, 0)

    def pin(self, digests: Iterable[bytes]) -> None:
        for d in digests:
            self._counts[d] = self._counts.get(d, 0) + 1

    def unpin(self, digests: Iterable[bytes]) -> None:
        """-1 on each; raises ValueError (changing nothing) if one is not pinned."""
        digests = list(digests)
        needed: dict[bytes, int] = {}
        for d in digests:
            needed[d] = needed.get(d, 0) + 1
            if needed[d] > self.count(d):
                raise ValueError(f"unpin of chunk {d[:8].hex()}, which is not pinned")
        for d in digests:
            count = self._counts[d] - 1
            if count:
                self._counts[d] = count
            else:
                del self._counts[d]

    @contextmanager
    def held(self, digests: list[bytes]) -> Iterator[None]:
        """Pin for the duration of a ``with`` block."""
        self.pin(digests)
        try:
            yield
        finally:
            self.unpin(digests)
