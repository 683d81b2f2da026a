"""The router's ZMQ subscriber to vLLM engines' own KV events.

    vLLM ZmqEventPublisher (PUB, connects; topic = instance id)
        --[topic, 8-byte big-endian seq, msgpack KVEventBatch [ts, events, dp_rank]]-->
    VLLMEventSubscriber (one SUB bound on loopback for every engine, one thread)
        -> per instance: sequence check, vLLM's replay ROUTER to fill a gap,
           VLLMRehasher (vLLM block hashes -> kvcluster chunk keys)
        -> kvcluster KVEventBatch -> the router's EventBus (its ingestor applies it)

vLLM keeps no snapshot, only a replay buffer ("send every batch from seq N", answered
by ``[b"", topic, seq, payload]`` frames and an end marker of seq -1). So a gap is filled
by replay; a gap the buffer no longer covers, a batch that cannot be decoded, or (with
no batch missed) a block whose parent was never announced resets the instance's view
and says so at ERROR level. A reset forwards AllCleared(None): the router then knows
only what the engine announces from there on, an under-estimate, never a stale claim.
Events whose settings cannot be re-hashed (:class:`RehashMismatch`) are never routed
on: the instance's batches are forwarded with the settings vLLM effectively uses, so
the ingestor flags it HASH_MISMATCH, until it is watched again or its engine restarts.

A PUB drops what it sends before the SUB's subscription reaches it, and an idle engine
sends nothing that would reveal that gap, so every ``probe_interval_s`` each instance's
replay tail is asked for too (all at once); the same answer tells a restarted engine (a
new buffer from seq 0), whose view is then rebuilt.

Forwarded batches are numbered 0, 1, 2... per instance, the first a reset batch, so the
ingestor sees one unbroken stream whatever vLLM's numbering did; when the ingestor asks
for a resync (its bus lost a batch), the instance is rebuilt from replay.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import zmq

from kvcluster.common.config import RouterConfig
from kvcluster.common.events import AllCleared, HashSettings, KVEvent, KVEventBatch
from router.event_bus import EventBus
from router.vllm_rehash import RehashMismatch, UnknownParent, VLLMRehasher
from router.vllm_replay import ReplayClient, Replayed, decode_batch

log = logging.getLogger("router.vllm")

_DIGESTS_KEPT = 4096
"""Recent batches remembered per instance, to tell a duplicate from an engine restart."""


@dataclass
class _Stream:
    """What the subscriber knows of one instance's vLLM event stream."""

    instance_id: str
    replay_endpoint: str
    rehasher: VLLMRehasher
    expected: int = 0
    """vLLM seq of the next batch to apply."""
    complete: bool = True
    """Every batch since vLLM's seq 0 was applied (so an unknown parent is an error)."""
    out_seq: int = 0
    reset_pending: bool = True
    """The next forwarded batch starts with AllCleared(None)."""
    mismatch: RehashMismatch | None = None
    replay_silent_since: float | None = None
    """When its replay endpoint stopped answering (None: it answers)."""
    published_while_silent: bool = False
    """A live batch came since its replay went silent: the engine is up, so a replay
    that still does not answer is a stale address (the engine restarted elsewhere)."""
    probe_after: float = 0.0
    """No probe before this (time.monotonic()): backoff while the replay is silent."""
    digests: dict[int, bytes] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)


class VLLMEventSubscriber:
    def __init__(self, bus: EventBus, settings: HashSettings, bind: str = "tcp://127.0.0.1:0",
                 replay_timeout_s: float = 1.0, poll_interval_s: float = 0.05,
                 probe_interval_s: float = 1.0):
        """Bind the SUB socket and start consuming (a daemon thread) until :meth:`close`.

        Give every vLLM engine :attr:`endpoint` as its ``kv_events_config.endpoint`` and
        its instance id as the topic, then :meth:`watch` it with its replay address.

        Args:
            bus: the router's event bus (the one its ingestor reads).
            settings: the router's hash settings (model id, hash step, chunk tokens):
                what the vLLM blocks are re-hashed into.
            bind: the SUB socket's address; port 0 picks a free one.
            replay_timeout_s: how long one replay request waits for each answer frame.
            poll_interval_s: the longest a watch/unwatch/close waits for the thread.
            probe_interval_s: how often each instance's replay buffer is asked for
                batches after the last one applied. A PUB drops what it sends before
                the SUB's subscription reaches it, and an engine that then goes idle
                sends nothing that would reveal the gap; the probe finds it.

        Raises:
            ValueError: settings without chunk tokens.
            zmq.ZMQError: ``bind`` cannot be bound.
        """
        self.bus = bus
        self.settings = settings
        VLLMRehasher(settings)  # validates settings here, not in the thread
        self.replay_timeout_s = replay_timeout_s
        self.poll_interval_s = poll_interval_s
        self.probe_interval_s = probe_interval_s
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")  # topics are matched exactly below
        try:
            self._sub.bind(bind)
        except zmq.ZMQError:
            self._sub.close(0)
            self._ctx.term()
            raise
        self._endpoint = self._sub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._streams: dict[str, _Stream] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._unwatched: Counter = Counter()
        self._stop = threading.Event()
        self._replayer = ReplayClient(self._ctx, replay_timeout_s, poll_interval_s, self._stop)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, bus: EventBus, settings: HashSettings,
                    config: RouterConfig) -> VLLMEventSubscriber:
        """One bound to ``config.vllm_events_bind`` with the config's replay timing."""
        return cls(bus, settings, bind=config.vllm_events_bind,
                   replay_timeout_s=config.vllm_replay_timeout_s,
                   probe_interval_s=config.vllm_probe_interval_s)

    # ------------------------------------------------------------ public API

    @property
    def endpoint(self) -> str:
        """The bound address (``tcp://127.0.0.1:PORT``): every engine's publish endpoint."""
        return self._endpoint

    def watch(self, instance_id: str, replay_endpoint: str = "") -> None:
        """Consume the batches with topic ``instance_id``; its vLLM replay ROUTER
        (``kv_events_config.replay_endpoint``, "" for none) fills gaps.

        Returns at once; the thread then replays what the engine already published.
        Watching an instance again (its engine restarted) rebuilds its view.
        """
        if not instance_id:
            raise ValueError("instance_id must be non-empty (it is the events' topic)")
        if replay_endpoint and not replay_endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"replay endpoint {replay_endpoint!r} is not a ZMQ address")
        self._command(("watch", instance_id, replay_endpoint))

    def unwatch(self, instance_id: str) -> None:
        """Stop consuming ``instance_id``'s batches and clear its view in the index."""
        self._command(("unwatch", instance_id, ""))

    def close(self) -> None:
        """Stop the thread and close the sockets (within a few poll intervals)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=10 * self.poll_interval_s + 2.0)
        if self._thread.is_alive():
            log.error("vLLM KV event subscriber thread did not stop; its sockets are left open")
            return
        self._ctx.term()

    def stats(self, instance_id: str) -> dict[str, int]:
        """Counters of one watched instance (batches, replays, resets, duplicates...)."""
        stream = self._streams.get(instance_id)
        return {} if stream is None else dict(stream.stats)

    def __enter__(self) -> VLLMEventSubscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ the thread

    def _command(self, command: tuple[str, str, str]) -> None:
        if self._closed:
            raise RuntimeError("VLLMEventSubscriber is closed")
        self._commands.put(command)

    def _run(self) -> None:
        next_resync_check = next_probe = 0.0
        try:
            while not self._stop.is_set():
                try:
                    self._run_commands()
                    if self._sub.poll(int(self.poll_interval_s * 1000)):
                        self._drain()
                    if time.monotonic() >= next_resync_check:
                        self._answer_resyncs()
                        next_resync_check = time.monotonic() + 0.2
                    if time.monotonic() >= next_probe:
                        self._probe()
                        next_probe = time.monotonic() + self.probe_interval_s
                except Exception:  # keep consuming; say it loudly
                    log.exception("vLLM KV event subscriber error")
                    self._stop.wait(self.poll_interval_s)
        finally:
            self._sub.close(0)

    def _run_commands(self) -> None:
        while True:
            try:
                kind, instance_id, replay_endpoint = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "watch":
                stream = _Stream(instance_id, replay_endpoint, VLLMRehasher(self.settings))
                self._streams[instance_id] = stream
                self._rebuild(stream, "watched")
            elif instance_id in self._streams:
                stream = self._streams.pop(instance_id)
                stream.mismatch, stream.reset_pending = None, True
                self._forward(stream, [])

    def _drain(self, max_messages: int = 1000) -> None:
        for _ in range(max_messages):
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_message(frames)

    def _on_message(self, frames: list[bytes]) -> None:
        topic = frames[0].decode("utf-8", "replace") if frames else ""
        stream = self._streams.get(topic)
        if stream is None:
            self._run_commands()  # a watch() made before this batch was sent counts
            stream = self._streams.get(topic)
        if stream is None:
            self._unwatched[topic] += 1
            if self._unwatched[topic] == 1:
                log.warning("vLLM KV events for unwatched topic %r dropped (watch() replays "
                            "them)", topic)
            return
        if len(frames) != 3 or len(frames[1]) != 8:
            stream.stats["malformed"] += 1
            log.error("vLLM %s: malformed KV event message (%d frames, seq frame %d bytes) "
                      "dropped; the sequence check catches a lost batch", topic, len(frames),
                      len(frames[1]) if len(frames) > 1 else 0)
            return
        if stream.replay_silent_since is not None and not stream.published_while_silent:
            stream.published_while_silent = True
            stream.probe_after = 0.0  # it is up: its tail is worth probing once more
        self._on_batch(stream, int.from_bytes(frames[1], "big"), frames[2])

    # ------------------------------------------------------------ sequence handling

    def _on_batch(self, stream: _Stream, seq: int, payload: bytes) -> None:
        if seq > stream.expected:
            self._catch_up(stream, until=seq)
        if seq < stream.expected:
            if stream.digests.get(seq) == _digest(payload):
                stream.stats["duplicates"] += 1
                return
            log.warning("vLLM %s: batch %d differs from the one applied under that number: "
                        "the engine restarted; rebuilding its view", stream.instance_id, seq)
            self._rebuild(stream, "engine restarted")
            if seq < stream.expected:
                return  # the replay delivered it
        if seq > stream.expected:
            self._lost(stream, stream.expected, seq)
        self._apply(stream, seq, payload)

    def _probe(self) -> None:
        """Replay every instance's tail, all requests at once: a PUB drops what it sends
        before the SUB's subscription reaches it, and an idle engine sends nothing that
        would reveal that gap (an idle vLLM publisher answers within its 0.1 s poll)."""
        now = time.monotonic()
        streams = [s for s in self._streams.values() if s.replay_endpoint and s.probe_after <= now]
        for stream, replayed in zip(streams, self._replay([(s, _tail(s)) for s in streams])):
            stream.stats["probes"] += 1
            self._apply_answer(stream, replayed)

    def _catch_up(self, stream: _Stream, until: int | None = None) -> None:
        """Replay the batches after the last applied one, up to the live batch ``until``."""
        stream.stats["replays"] += 1
        self._apply_answer(stream, self._replay([(stream, _tail(stream))])[0], until)

    def _apply_answer(self, stream: _Stream, replayed: Replayed | None,
                      until: int | None = None) -> None:
        """Apply a replay answer that starts at :func:`_tail`; one from a restarted
        engine (a new buffer from seq 0) rebuilds the view instead."""
        if replayed is None:
            return  # no answer (logged): the next probe or gap asks again
        if _restarted(stream, replayed):
            log.warning("vLLM %s: its replay buffer no longer holds batch %d as applied: the "
                        "engine restarted; rebuilding its view", stream.instance_id,
                        stream.expected - 2)
            self._rebuild(stream, "engine restarted")
        else:
            self._apply_replayed(stream, replayed, until)

    def _apply_replayed(self, stream: _Stream, replayed: Replayed,
                        until: int | None = None) -> None:
        """Apply replayed batches in order; a range missing from them is lost (a reset)."""
        for seq, payload in replayed:
            if seq < stream.expected:
                continue
            if seq > stream.expected:
                if until is not None and seq > until:
                    return  # the live batch that revealed the gap comes first
                self._lost(stream, stream.expected, seq)
            self._apply(stream, seq, payload)

    def _rebuild(self, stream: _Stream, why: str) -> None:
        """Start the view over from vLLM's seq 0 (watch, restart, resync request)."""
        stream.rehasher.clear()
        stream.expected, stream.complete = 0, True
        stream.mismatch, stream.reset_pending = None, True
        stream.digests.clear()
        stream.stats["rebuilds"] += 1
        self._catch_up(stream)
        if stream.reset_pending:
            self._forward(stream, [])  # the ingestor's snapshot, even of nothing
        log.info("vLLM %s: view rebuilt (%s) through seq %d", stream.instance_id, why,
                 stream.expected - 1)

    def _lost(self, stream: _Stream, first: int, upto: int) -> None:
        self._reset(stream, f"batches {first}..{upto - 1} lost and no longer in its replay "
                            f"buffer{'' if stream.replay_endpoint else ' (it has none)'}")
        stream.expected = upto

    def _apply(self, stream: _Stream, seq: int, payload: bytes) -> None:
        stream.expected = seq + 1
        stream.stats["batches"] += 1
        stream.digests[seq] = _digest(payload)
        if len(stream.digests) > _DIGESTS_KEPT:
            del stream.digests[next(iter(stream.digests))]
        if stream.mismatch is not None:
            self._forward(stream, [])  # keeps the ingestor refusing, and it sees why
            return
        try:
            events = decode_batch(payload)
        except ValueError as exc:
            self._reset(stream, f"batch {seq} undecodable ({exc})")
            return
        self._forward(stream, self._translate(stream, seq, events))

    def _translate(self, stream: _Stream, seq: int, events: list[dict]) -> list[KVEvent]:
        try:
            try:
                return stream.rehasher.translate(events, lenient=not stream.complete)
            except UnknownParent as exc:
                self._reset(stream, f"batch {seq}: {exc}")
                return stream.rehasher.translate(events, lenient=True)
        except RehashMismatch as exc:
            log.error("vLLM %s: its KV events cannot be routed on: %s", stream.instance_id, exc)
            stream.mismatch = exc
            stream.stats["mismatched"] += 1
        except ValueError as exc:
            self._reset(stream, f"batch {seq} malformed ({exc})")
        return []

    def _reset(self, stream: _Stream, reason: str) -> None:
        log.error("vLLM %s: %s; its view is reset (the router knows only blocks announced "
                  "from here on)", stream.instance_id, reason)
        stream.stats["resets"] += 1
        stream.rehasher.clear()
        stream.complete, stream.reset_pending = False, True
        self._forward(stream, [])

    def _answer_resyncs(self) -> None:
        for stream in list(self._streams.values()):
            if self.bus.take_resync_request(stream.instance_id):
                log.warning("vLLM %s: the router asked for a resync; rebuilding from replay",
                            stream.instance_id)
                self._rebuild(stream, "resync requested")

    def _forward(self, stream: _Stream, events: list[KVEvent]) -> None:
        settings = self.settings
        if stream.mismatch is not None:
            settings, events = stream.mismatch.settings or _refused(self.settings), []
        elif stream.reset_pending:
            events, stream.reset_pending = [AllCleared(None), *events], False
        elif not events:
            return
        batch = KVEventBatch(stream.instance_id, stream.out_seq, settings, events)
        stream.out_seq += 1  # before publishing: a lost batch is a gap the ingestor sees
        self.bus.publish(batch)

    # ------------------------------------------------------------ replay

    def _replay(self, requests: list[tuple[_Stream, int]]) -> list[Replayed | None]:
        """Per (instance, start seq): its replay buffer's batches from ``start`` on;
        None where it has no replay address or did not answer (then probed less)."""
        asked = [(stream, start) for stream, start in requests if stream.replay_endpoint]
        answers = iter(self._replayer.fetch([(s.replay_endpoint, start) for s, start in asked]))
        results = [next(answers) if stream.replay_endpoint else None for stream, _ in requests]
        for (stream, start), result in zip(requests, results):
            if not stream.replay_endpoint or self._stop.is_set():
                continue
            if result is None:
                self._unanswered(stream, start)
            elif stream.replay_silent_since is not None:
                log.warning("vLLM %s: its replay endpoint answers again", stream.instance_id)
                stream.replay_silent_since, stream.probe_after = None, 0.0
                stream.published_while_silent = False
        return results

    def _unanswered(self, stream: _Stream, start: int) -> None:
        """A replay got no end marker: say so once, and probe that instance less often
        (backing off to 30 s) so a down or still-starting engine does not stall the
        others' events."""
        now = time.monotonic()
        if stream.replay_silent_since is None:
            stream.replay_silent_since = now
            log.warning("vLLM %s: replay from %d at %s got no end marker within %.1f s; "
                        "engine down or not started yet?", stream.instance_id, start,
                        stream.replay_endpoint, self.replay_timeout_s)
        elif stream.published_while_silent and not stream.stats["stale_replay"]:
            stream.stats["stale_replay"] += 1
            log.error("vLLM %s: its engine publishes but its replay endpoint %s does not "
                      "answer: a stale address (the engine restarted on another port?); "
                      "gaps cannot be filled until it is watched with its new replay "
                      "address", stream.instance_id, stream.replay_endpoint)
        silent_s = now - stream.replay_silent_since
        stream.probe_after = now + min(30.0, max(self.probe_interval_s, silent_s))

def _tail(stream: _Stream) -> int:
    """Where a replay for ``stream`` starts: two batches before the next expected one.

    vLLM appends a batch to its replay buffer just *after* sending it, so the newest
    batch applied may not be there yet; the one before it is, and it tells a live
    buffer from a restarted engine's (:func:`_restarted`).
    """
    return max(stream.expected - 2, 0)


def _restarted(stream: _Stream, replayed: Replayed) -> bool:
    """Whether an answer from ``_tail(stream)`` comes from another publisher."""
    if stream.expected < 2:
        return False  # nothing to compare yet; a restart shows once it publishes
    if not replayed:
        return True  # a live buffer holds batch expected - 2 or newer ones
    seq, payload = replayed[0]
    known = stream.digests.get(seq)
    return seq == stream.expected - 2 and known is not None and known != _digest(payload)


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def _refused(settings: HashSettings) -> HashSettings:
    """Settings no router has (tokens_per_hash 0): the ingestor refuses the batch."""
    return HashSettings(settings.model_id, settings.block_size, 0, settings.hash_version)
