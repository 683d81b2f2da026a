"""The connector's scheduler half: what the tiers hold, what each step loads and saves.

It never touches KV. It keeps a mirror of the worker's store (chunk key u64 -> tier),
built from the tier events the worker returns with every step's output; since CPU
scheduling is synchronous, the mirror is exact when the next step is planned (the
worker only evicts while saving, after a step's loads). A chunk that vanished anyway
(a disk file found corrupt, Redis gone) fails its load, and vLLM recomputes its blocks.

Per request it knows the chunk keys of the prompt (kvcluster.common.hashing, salted with
the model id and the request's ``cache_salt`` as tenant), the vLLM block table, and how
many whole prompt chunks were already saved or skipped.

PD (kv_transfer_params, see metadata.PD_RECV / PD_SEND): a decode instance's request
whose prompt streams in from a prefill instance is reported as an asynchronous external
hit (vLLM allocates its blocks and holds it in WAITING_FOR_REMOTE_KVS while the prefill
computes; a RecvSpec tells the worker's receiver where to write). A prefill instance's
request opens its stream on its first step and hands over its whole chunks as each
step completes them (SendSpec).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from vllm.distributed.kv_events import BlockRemoved, BlockStored

from kvcluster.common.events import Tier
from kvcluster.common.hashing import BlockHash, ExtraKeys, chunk_hashes
from kvcluster.integrations.vllm.metadata import (OWNERSHIP, PD_RECV, PD_SEND, ConnectorMeta,
                                                  ConnectorSettings, LoadSpec, RecvSpec,
                                                  SaveSpec, SendSpec)
from kvcluster.common.event_media import tier_of_medium

log = logging.getLogger(__name__)


@dataclass
class _Request:
    tenant: str
    prompt_len: int
    keys: list[BlockHash]
    """Chunk keys of every whole prompt chunk."""
    block_ids: list[int] = field(default_factory=list)
    next_chunk: int = 0
    """Chunks below this were saved, loaded or found stored already."""
    hit_end: int = 0
    """Token end of the last reported external hit."""
    loaded_by_tier: dict[str, int] = field(default_factory=dict)
    """Tokens this request loaded from each tier (by the mirror's view when planned)."""
    all_token_ids: Sequence[int] = ()
    """vLLM's live list of the request's tokens (prompt, then each sampled token as it is
    appended): the generated tokens' whole chunks are saved too, so that the next turn of
    a chat, whose prompt holds this answer, finds them in the tiers."""
    extra: ExtraKeys | None = None
    token_ids: list[int] = field(default_factory=list)
    """The prompt, kept for PD requests only."""
    recv: dict | None = None
    """PD_RECV params until the receive is planned."""
    recv_blocks: list[int] = field(default_factory=list)
    """Blocks waiting for the stream, until vLLM reports the receive finished."""
    send: dict | None = None
    """PD_SEND params until the last chunk is handed over."""
    lost_tokens: int = 0
    recv_planned_s: float = 0.0
    recv_wait_ms: float = 0.0
    """Blocks allocated -> the receive finished (what the request waited for its KV)."""
    """Planned stream tokens vLLM computed after all (their blocks failed)."""
    send_started: bool = False
    next_send_token: int = 0


class SchedulerSide:
    def __init__(self, settings: ConnectorSettings, vllm_block_size: int):
        if settings.chunk_tokens % vllm_block_size:
            raise ValueError(f"store.chunk_tokens ({settings.chunk_tokens}) must be a multiple "
                             f"of vLLM's block_size ({vllm_block_size})")
        if not settings.config.workers.colocated and (
                settings.config.transfer.chunk_tokens % vllm_block_size):
            raise ValueError(f"transfer.chunk_tokens ({settings.config.transfer.chunk_tokens})"
                             f" must be a multiple of vLLM's block_size ({vllm_block_size}):"
                             f" a streamed chunk is written into whole blocks")
        self.settings = settings
        self.block_size = vllm_block_size
        self.chunk_tokens = settings.chunk_tokens
        self.held: dict[int, Tier] = {}
        """Mirror of the worker's store: chunk key u64 -> tier."""
        self._requests: dict[str, _Request] = {}
        self._loads: list[LoadSpec] = []
        self._recvs: list[RecvSpec] = []
        self._events: list = []
        self.loaded_tokens = 0

    # ------------------------------------------------------------ vLLM hooks

    def on_new_request(self, request_id: str, prompt_token_ids: list[int],
                       cache_salt: str | None, kv_transfer_params: dict | None = None,
                       all_token_ids: Sequence[int] = ()) -> None:
        """``kv_transfer_params``: PD_RECV / PD_SEND for a request of the PD path."""
        tenant = cache_salt or ""
        extra = ExtraKeys(self.settings.model_id, tenant)
        keys = chunk_hashes(prompt_token_ids, self.settings.hash_block_size,
                            self.chunk_tokens, extra)
        req = self._requests[request_id] = _Request(tenant, len(prompt_token_ids), keys,
                                                    all_token_ids=all_token_ids, extra=extra)
        params = kv_transfer_params or {}
        req.recv, req.send = params.get(PD_RECV), params.get(PD_SEND)
        if req.recv or req.send:
            req.token_ids = list(prompt_token_ids)

    def num_new_matched_tokens(self, request_id: str, num_computed_tokens: int
                               ) -> tuple[int, bool]:
        """Tokens past ``num_computed_tokens`` the tiers can fill (loaded synchronously)
        or a prefill instance will stream (True: asynchronously)."""
        req = self._requests.get(request_id)
        if req is None:
            return 0, False
        # vLLM must compute at least the last prompt token itself.
        usable = min(len(req.keys), (req.prompt_len - 1) // self.chunk_tokens)
        if req.recv is not None:
            end = min(int(req.recv["num_tokens"]), usable * self.chunk_tokens)
            if end > num_computed_tokens:
                req.hit_end = end
                return end - num_computed_tokens, True
            req.recv = None  # vLLM's prefix cache holds it: the stream goes unused
        held = 0
        while held < usable and req.keys[held].u64 in self.held:
            held += 1
        req.hit_end = held * self.chunk_tokens
        return max(0, req.hit_end - num_computed_tokens), False

    def after_alloc(self, request_id: str, block_ids: list[int], num_external: int) -> None:
        req = self._requests.get(request_id)
        if req is None:
            return
        req.block_ids = list(block_ids)
        if num_external <= 0:
            return
        if req.recv is not None:
            self._plan_recv(request_id, req, num_external)
            return
        first_token = req.hit_end - num_external
        first_chunk = first_token // self.chunk_tokens
        last_chunk = req.hit_end // self.chunk_tokens
        blocks = req.block_ids[first_token // self.block_size: req.hit_end // self.block_size]
        for c in range(first_chunk, last_chunk):
            tier = self.held[req.keys[c].u64].name.lower()
            tokens = min(self.chunk_tokens, (c + 1) * self.chunk_tokens - first_token)
            req.loaded_by_tier[tier] = req.loaded_by_tier.get(tier, 0) + tokens
        self._loads.append(LoadSpec(request_id, [k.digest for k in req.keys[first_chunk:last_chunk]],
                                    first_chunk, first_token, blocks))
        req.next_chunk = max(req.next_chunk, last_chunk)
        self.loaded_tokens += num_external

    def build_meta(self, scheduler_output) -> ConnectorMeta:
        meta = ConnectorMeta(loads=self._loads, recvs=self._recvs)
        self._loads, self._recvs = [], []
        for new in scheduler_output.scheduled_new_reqs:
            req = self._requests.get(new.req_id)
            if req is not None:
                req.block_ids = list(new.block_ids[0])
                computed = (new.num_computed_tokens
                            + scheduler_output.num_scheduled_tokens.get(new.req_id, 0))
                self._plan_saves(meta, new.req_id, req, computed)
                self._plan_sends(meta, new.req_id, req, computed)
        cached = scheduler_output.scheduled_cached_reqs
        for i, request_id in enumerate(cached.req_ids):
            req = self._requests.get(request_id)
            if req is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if request_id in cached.resumed_req_ids:
                    req.block_ids = list(new_blocks[0])  # the whole table after preemption
                else:
                    req.block_ids.extend(new_blocks[0])
            computed = (cached.num_computed_tokens[i]
                        + scheduler_output.num_scheduled_tokens.get(request_id, 0))
            self._plan_saves(meta, request_id, req, computed)
            self._plan_sends(meta, request_id, req, computed)
        return meta

    def knows(self, request_id: str) -> bool:
        return request_id in self._requests

    def request_finished(self, request_id: str) -> dict[str, int]:
        """Forget the request. Returns the tokens it loaded from each tier."""
        req = self._requests.pop(request_id, None)
        return req.loaded_by_tier if req is not None else {}

    def lost_tokens(self, request_id: str) -> int:
        """Tokens of the request's planned stream that vLLM computed after all."""
        req = self._requests.get(request_id)
        return req.lost_tokens if req is not None else 0

    def recv_wait_ms(self, request_id: str) -> float:
        """How long the request waited in vLLM for its stream (0: it had none)."""
        req = self._requests.get(request_id)
        return req.recv_wait_ms if req is not None else 0.0

    def on_recv_outcome(self, invalid_block_ids: set[int], finished_recving: set[str]
                        ) -> None:
        """A stream that filled fewer blocks than planned counts only what it filled
        as "transfer" (vLLM computes the rest); a finished receive is settled."""
        for request_id, req in self._requests.items():
            if not req.recv_blocks:
                continue
            bad = [i for i, b in enumerate(req.recv_blocks) if b in invalid_block_ids]
            if bad:
                lost = (len(req.recv_blocks) - bad[0]) * self.block_size
                req.loaded_by_tier["transfer"] = max(
                    0, req.loaded_by_tier.get("transfer", 0) - lost)
                self.loaded_tokens -= lost
                req.lost_tokens += lost
                req.recv_blocks = req.recv_blocks[:bad[0]]
            if request_id in finished_recving:
                req.recv_blocks = []
                req.recv_wait_ms = (time.monotonic() - req.recv_planned_s) * 1e3

    def on_worker_events(self, events: Iterable) -> None:
        """Apply the worker's tier events to the mirror and queue them for publishing."""
        for event in events:
            tier = tier_of_medium(event.medium)
            if isinstance(event, BlockStored):
                for h in event.block_hashes:
                    self.held[int(h)] = tier
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    if self.held.get(int(h)) == tier:
                        del self.held[int(h)]
            self._events.append(event)

    def take_events(self) -> list:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------ helpers

    def _plan_saves(self, meta: ConnectorMeta, request_id: str, req: _Request,
                    computed_after_step: int) -> None:
        """Runs of whole chunks this step completes that no tier holds yet: the prompt's,
        then (with vLLM's live token list) the generated tokens'."""
        done = min(computed_after_step, req.prompt_len) // self.chunk_tokens
        done = min(done, len(req.keys))
        if computed_after_step > req.prompt_len and req.all_token_ids:
            self._extend_keys(req, computed_after_step)
            done = min(computed_after_step // self.chunk_tokens, len(req.keys))
        run: list[int] = []
        for c in range(req.next_chunk, done):
            if req.keys[c].u64 in self.held:
                self._flush_run(meta, request_id, req, run)
                run = []
            else:
                run.append(c)
        self._flush_run(meta, request_id, req, run)
        req.next_chunk = max(req.next_chunk, done)

    def _extend_keys(self, req: _Request, computed_after_step: int) -> None:
        """Keys of the whole chunks in ``[0, computed_after_step)`` whose tokens vLLM's
        list already holds (with async scheduling it can lag a step behind: those chunks
        wait for the next step)."""
        known = min(computed_after_step, len(req.all_token_ids)) // self.chunk_tokens
        if known > len(req.keys):
            tokens = list(req.all_token_ids[: known * self.chunk_tokens])
            req.keys = chunk_hashes(tokens, self.settings.hash_block_size, self.chunk_tokens,
                                    req.extra)

    def _plan_recv(self, request_id: str, req: _Request, num_external: int) -> None:
        """The blocks of tokens ``[hit_end - num_external, hit_end)`` wait for the
        stream (whole chunks: the decoder saves them into its tiers once computed)."""
        assert req.recv is not None
        first_token, B = req.hit_end - num_external, self.block_size
        blocks = req.block_ids[first_token // B: req.hit_end // B]
        self._recvs.append(RecvSpec(request_id, str(req.recv["transfer_id"]),
                                    req.token_ids[:req.hit_end], first_token, req.hit_end,
                                    blocks, float(req.recv.get("timeout_s", 30.0))))
        req.recv_blocks = list(blocks)
        req.recv_planned_s = time.monotonic()
        req.loaded_by_tier["transfer"] = req.loaded_by_tier.get("transfer", 0) + num_external
        self.loaded_tokens += num_external
        req.recv = None

    def _plan_sends(self, meta: ConnectorMeta, request_id: str, req: _Request,
                    computed_after_step: int) -> None:
        """Open the stream on the first step; hand over the whole chunks each step
        completes, up to the tokens the stream carries."""
        send = req.send
        if send is None:
            return
        num_tokens, B = int(send["num_tokens"]), self.block_size
        spec = None
        if not req.send_started:
            req.send_started = True
            spec = SendSpec(request_id, str(send["transfer_id"]), target=str(send["target"]),
                            token_ids=req.token_ids[:num_tokens],
                            slo_ms=float(send.get("slo_ms") or 0.0))
        done = min(computed_after_step, num_tokens) // self.chunk_tokens * self.chunk_tokens
        start = req.next_send_token
        if done > start and len(req.block_ids) >= done // B:
            spec = spec or SendSpec(request_id, str(send["transfer_id"]))
            spec.first_token, spec.block_ids = start, req.block_ids[start // B: done // B]
            req.next_send_token = done
        if spec is not None:
            meta.sends.append(spec)
        if req.next_send_token >= num_tokens:
            req.send = None

    def _flush_run(self, meta: ConnectorMeta, request_id: str, req: _Request,
                   chunks: list[int]) -> None:
        if not chunks:
            return
        per_chunk = self.chunk_tokens // self.block_size
        first, end = chunks[0] * per_chunk, (chunks[-1] + 1) * per_chunk
        if len(req.block_ids) < end:  # vLLM holds fewer blocks than tokens computed?
            log.error("request %s: %d blocks for %d computed tokens; chunks %s not saved",
                      request_id, len(req.block_ids), end * self.block_size, chunks)
            return
        meta.saves.append(SaveSpec(request_id, req.tenant, [req.keys[c].digest for c in chunks],
                                   req.block_ids[first:end]))


def is_kvcluster_event(event) -> bool:
    return getattr(event, "ownership", None) == OWNERSHIP
