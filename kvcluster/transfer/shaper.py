"""Bandwidth limits for tests and benchmarks: a base class and a factory.

A shaper has two verbs: ``set_rate(bits_per_s)`` changes the limit (a trace
redraws it per chunk) and ``await acquire(num_bytes)`` is called by the sender
before each message. Implementations:

* :class:`~kvcluster.transfer.tc_shaper.TcShaper`: a real limit, ``tc tbf`` on
  the sender's veth inside a network namespace (see :mod:`.netns`);
  ``acquire`` does nothing, the kernel paces the bytes.
* :class:`~kvcluster.transfer.token_bucket.TokenBucketShaper`: where
  namespaces are impossible, the sender paces itself. Output that used it is
  labelled ``token-bucket (in-sender)``.
* :class:`NullShaper`: no limit.
"""

from __future__ import annotations

import abc


class Shaper(abc.ABC):
    label: str
    """How the limit is enforced, printed next to every result that used it."""

    @abc.abstractmethod
    def set_rate(self, bits_per_s: float) -> None: ...

    @abc.abstractmethod
    async def acquire(self, num_bytes: int) -> None:
        """Wait until ``num_bytes`` may go on the wire."""


class NullShaper(Shaper):
    label = "none"

    def set_rate(self, bits_per_s: float) -> None:
        pass

    async def acquire(self, num_bytes: int) -> None:
        pass


def make_shaper(kind: str, bits_per_s: float = 1e9, device: str = "") -> Shaper:
    """``none``, ``token-bucket`` or ``tc`` (``device``: the veth to shape)."""
    if kind == "none":
        return NullShaper()
    if kind == "token-bucket":
        from kvcluster.transfer.token_bucket import TokenBucketShaper
        return TokenBucketShaper(bits_per_s)
    if kind == "tc":
        from kvcluster.transfer.tc_shaper import TcShaper
        return TcShaper(device, bits_per_s)
    raise ValueError(f"unknown shaper {kind!r}: none, token-bucket or tc")
