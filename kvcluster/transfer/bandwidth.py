"""Bandwidth estimate of one sender -> receiver link: a probe, then moving statistics.

The first observation (the probe: the first chunk ever sent on the link) sets
the estimate; every later chunk adds a sample. Two views of the samples:

* ``bytes_per_s``: an exponentially weighted moving average over *seconds per
  byte* (not bytes per second: when the bandwidth jumps around, 0.1-10 Gbit/s,
  the mean of the rates, 5 Gbit/s, overstates the expected time per byte,
  which corresponds to 2.15 Gbit/s);
* ``planning_bytes_per_s(q)``: the q-quantile of the last ``window`` samples,
  what the policy plans with. On a steady link it equals the average; on a
  link that varies from chunk to chunk it is a rate the next chunk will beat
  with probability ~1-q, which is what keeps the SLO met there;
* ``seconds_per_byte_samples()``: the last ``history`` samples as they were
  measured, for the policy's risk check, which resamples them to see how
  likely a choice is to leave the request unable to finish in time. It needs
  the rare slow samples (a 1-in-100 draw), hence a longer memory than the
  quantile's window.
"""

from __future__ import annotations

import collections


class BandwidthEstimator:
    def __init__(self, alpha: float = 0.3, window: int = 32, min_probe_bytes: int = 64 << 10,
                 history: int = 256):
        """
        Args:
            alpha: weight of the newest sample in the moving average (0 < alpha <= 1).
            window: samples kept for the quantile.
            min_probe_bytes: transfers smaller than this are too short to time and are ignored.
            history: samples kept for the policy's risk check (at least ``window``).
        """
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.min_probe_bytes = min_probe_bytes
        self._seconds_per_byte: float | None = None
        self._samples: collections.deque[float] = collections.deque(maxlen=window)
        self._history: collections.deque[float] = collections.deque(maxlen=max(history, window))

    @property
    def has_estimate(self) -> bool:
        return self._seconds_per_byte is not None

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    @property
    def bytes_per_s(self) -> float | None:
        """Moving average, None before the probe."""
        return None if self._seconds_per_byte is None else 1.0 / self._seconds_per_byte

    def planning_bytes_per_s(self, quantile: float) -> float | None:
        """The ``quantile`` of recent samples (0 < q < 1); the moving average for q <= 0."""
        if quantile <= 0 or not self._samples:
            return self.bytes_per_s
        ordered = sorted(self._samples)
        return ordered[int(quantile * (len(ordered) - 1))]

    def seconds_per_byte_samples(self) -> tuple[float, ...]:
        """The last ``history`` samples, seconds per byte, oldest first."""
        return tuple(self._history)

    def observe(self, num_bytes: int, seconds: float) -> None:
        """Record that ``num_bytes`` took ``seconds`` on the wire."""
        if num_bytes < self.min_probe_bytes or seconds <= 0:
            return
        sample = seconds / num_bytes
        if self._seconds_per_byte is None:
            self._seconds_per_byte = sample
        else:
            self._seconds_per_byte += self.alpha * (sample - self._seconds_per_byte)
        self._samples.append(num_bytes / seconds)
        self._history.append(sample)

    def seconds_for(self, num_bytes: int) -> float:
        """Expected wire time of ``num_bytes`` at the moving average; raises before the probe."""
        if self._seconds_per_byte is None:
            raise RuntimeError("no bandwidth estimate yet: send a probe chunk first")
        return num_bytes * self._seconds_per_byte
