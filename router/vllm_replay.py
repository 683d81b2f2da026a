"""vLLM's KV event wire format, seen from the router: batches and the replay protocol.

Live, on the engine's PUB socket (one message per batch)::

    [topic (instance id) | seq: u64 big-endian (8 bytes) | msgpack KVEventBatch]
    KVEventBatch = [ts, [event map tagged by "type", ...], data_parallel_rank?]

Replay, the engine's ROUTER socket (a DEALER asks "every buffered batch from seq N")::

    request:  [b"" | N: u64 big-endian]
    answers:  [b"" | topic | seq | payload] ... then [b"" | b"" | -1 as i64 | b""]

The engine keeps its last ``buffer_steps`` batches; it appends one to the buffer just
after sending it live.
"""

from __future__ import annotations

import logging
import threading
import time

import msgpack
import zmq

log = logging.getLogger("router.vllm")

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The seq frame of vLLM's end-of-replay marker."""

Replayed = list[tuple[int, bytes]]
"""(seq, payload) of replayed batches, in seq order."""


def decode_batch(payload: bytes) -> list[dict]:
    """The events of one msgpack vLLM KVEventBatch ``[ts, events, dp_rank?]``.

    Raises:
        ValueError: bytes that are not such a batch.
    """
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise ValueError(f"not msgpack: {exc}") from exc
    if not isinstance(batch, (list, tuple)) or len(batch) < 2 \
            or not isinstance(batch[1], (list, tuple)):
        raise ValueError(f"not a vLLM KVEventBatch [ts, events, ...]: {batch!r:.100}")
    events = list(batch[1])
    if not all(isinstance(e, dict) for e in events):
        raise ValueError("a KV event that is not a map")
    return events


class ReplayClient:
    """Asks vLLM replay ROUTERs for buffered batches, many requests in flight at once."""

    def __init__(self, ctx: zmq.Context, timeout_s: float, poll_interval_s: float,
                 stop: threading.Event):
        """
        Args:
            timeout_s: how long to wait for the next frame of an answer.
            poll_interval_s: how often ``stop`` is checked while waiting.
            stop: set: give up at once (the subscriber is closing).
        """
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self.stop = stop

    def fetch(self, requests: list[tuple[str, int]]) -> list[Replayed | None]:
        """Per (replay endpoint, start seq): every batch buffered from ``start`` on.

        None where no end marker came within ``timeout_s`` of the last frame (an engine
        down or not started yet), or when stopped.
        """
        results: list[Replayed | None] = [[] for _ in requests]
        poller, pending = zmq.Poller(), {}
        try:
            for i, (endpoint, start) in enumerate(requests):
                try:
                    pending[self._ask(endpoint, start, poller)] = i
                except zmq.ZMQError as exc:
                    log.error("vLLM replay endpoint %r: %s", endpoint, exc)
                    results[i] = None
            deadline = time.monotonic() + self.timeout_s
            while pending and not self.stop.is_set() and time.monotonic() < deadline:
                wait_ms = int(min(deadline - time.monotonic(), self.poll_interval_s) * 1000) + 1
                for sock, _ in poller.poll(wait_ms):
                    deadline = time.monotonic() + self.timeout_s  # progress
                    i = pending[sock]
                    if _read(sock, requests[i][0], results[i]):
                        poller.unregister(sock)
                        sock.close(0)
                        del pending[sock]
            for i in pending.values():
                results[i] = None
        finally:
            for sock in pending:
                sock.close(0)
        return results

    def _ask(self, endpoint: str, start: int, poller: zmq.Poller) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            sock.send_multipart([b"", start.to_bytes(8, "big")])
        except zmq.ZMQError:
            sock.close(0)
            raise
        poller.register(sock, zmq.POLLIN)
        return sock


def _read(sock: zmq.Socket, endpoint: str, out: Replayed) -> bool:
    """Read the frames ready on one replay socket. Returns True at the end marker."""
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)  # [b"", topic, seq, payload]
        except zmq.Again:
            return False
        if len(frames) != 4 or len(frames[2]) != 8:
            log.error("vLLM replay from %s: malformed frame skipped", endpoint)
        elif frames[2] == END_SEQ:
            return True
        else:
            out.append((int.from_bytes(frames[2], "big"), frames[3]))
