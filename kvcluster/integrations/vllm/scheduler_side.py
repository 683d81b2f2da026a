"""The connector's scheduler half: what the tiers hold, what each step loads and saves.

It never touches KV. It keeps a mirror of the worker's store (chunk key u64 -> tier),
built from the tier events the worker returns with every step's output; since CPU
scheduling is synchronous, the mirror is exact when the next step is planned (the
worker only evicts while saving, after a step's loads). A chunk that vanished anyway
(a disk file found corrupt, Redis gone) fails its load, and vLLM recomputes its blocks.

Per request it knows the chunk keys of the prompt (kvcluster.common.hashing, salted with
the model id and the request's ``cache_salt`` as tenant), the vLLM block table, and how
many whole prompt chunks were already saved or skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from vllm.distributed.kv_events import BlockRemoved, BlockStored

from kvcluster.common.events import Tier
from kvcluster.common.hashing import BlockHash, ExtraKeys, chunk_hashes
from kvcluster.integrations.vllm.metadata import (OWNERSHIP, ConnectorMeta, ConnectorSettings,
                                                  LoadSpec, SaveSpec)
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


class SchedulerSide:
    def __init__(self, settings: ConnectorSettings, vllm_block_size: int):
        if settings.chunk_tokens % vllm_block_size:
            raise ValueError(f"store.chunk_tokens ({settings.chunk_tokens}) must be a multiple "
                             f"of vLLM's block_size ({vllm_block_size})")
        self.settings = settings
        self.block_size = vllm_block_size
        self.chunk_tokens = settings.chunk_tokens
        self.held: dict[int, Tier] = {}
        """Mirror of the worker's store: chunk key u64 -> tier."""
        self._requests: dict[str, _Request] = {}
        self._loads: list[LoadSpec] = []
        self._events: list = []
        self.loaded_tokens = 0

    # ------------------------------------------------------------ vLLM hooks

    def on_new_request(self, request_id: str, prompt_token_ids: list[int],
                       cache_salt: str | None, received_chunks: int = 0,
                       all_token_ids: Sequence[int] = ()) -> None:
        """``received_chunks``: the request's first chunks, received from a prefill
        instance, were put into the worker's host tier just before the request was added
        (``kvcluster_received_chunks`` in its kv_transfer_params): the mirror counts them
        now, before their tier events come back with a step. Should they be gone when
        loaded, the load fails and vLLM recomputes them."""
        tenant = cache_salt or ""
        extra = ExtraKeys(self.settings.model_id, tenant)
        keys = chunk_hashes(prompt_token_ids, self.settings.hash_block_size,
                            self.chunk_tokens, extra)
        for key in keys[:received_chunks]:
            self.held.setdefault(key.u64, Tier.HOST)
        self._requests[request_id] = _Request(tenant, len(prompt_token_ids), keys,
                                              all_token_ids=all_token_ids, extra=extra)

    def num_new_matched_tokens(self, request_id: str, num_computed_tokens: int) -> int:
        """Tokens past ``num_computed_tokens`` the tiers can fill (loaded synchronously)."""
        req = self._requests.get(request_id)
        if req is None:
            return 0
        # vLLM must compute at least the last prompt token itself.
        usable = min(len(req.keys), (req.prompt_len - 1) // self.chunk_tokens)
        held = 0
        while held < usable and req.keys[held].u64 in self.held:
            held += 1
        req.hit_end = held * self.chunk_tokens
        return max(0, req.hit_end - num_computed_tokens)

    def after_alloc(self, request_id: str, block_ids: list[int], num_external: int) -> None:
        req = self._requests.get(request_id)
        if req is None:
            return
        req.block_ids = list(block_ids)
        if num_external <= 0:
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
        meta = ConnectorMeta(loads=self._loads)
        self._loads = []
        for new in scheduler_output.scheduled_new_reqs:
            req = self._requests.get(new.req_id)
            if req is not None:
                req.block_ids = list(new.block_ids[0])
                self._plan_saves(meta, new.req_id, req, new.num_computed_tokens
                                 + scheduler_output.num_scheduled_tokens.get(new.req_id, 0))
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
            self._plan_saves(meta, request_id, req, cached.num_computed_tokens[i]
                             + scheduler_output.num_scheduled_tokens.get(request_id, 0))
        return meta

    def knows(self, request_id: str) -> bool:
        return request_id in self._requests

    def request_finished(self, request_id: str) -> dict[str, int]:
        """Forget the request. Returns the tokens it loaded from each tier."""
        req = self._requests.pop(request_id, None)
        return req.loaded_by_tier if req is not None else {}

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
