"""A compact continuous-batching loop over :class:`ModelRunner` (nano-vllm style).

Each :meth:`LLMEngine.step` either prefills the waiting requests that fit
(one at a time, each producing its first token) or, when none waits, decodes
every running request by one token in a single ragged batch. Requests join and
leave between steps. Full blocks are shared across requests by their chained
hashes, registered with the runner's :class:`BlockManager` (the one owner of the
pool's blocks); when the pool runs dry the newest running request is preempted
(its blocks freed, recomputed later, usually from those registered blocks).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import NamedTuple
from typing import Sequence as SequenceT

from kvcluster.common.hashing import BlockHash, ExtraKeys, hash_blocks, root_hash
from kvcluster.common.sampling import SamplingParams
from kvcluster.engine.block_manager import OutOfBlocksError
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.sampling import Sampler, finish_reason
from kvcluster.engine.sequence import Sequence


class StepOutput(NamedTuple):
    request_id: str
    token_id: int
    finished: bool


class LLMEngine:
    def __init__(self, runner: ModelRunner, stop_on_eos: bool = True, tenant_salt: str = ""):
        """
        Args:
            stop_on_eos: also stop at the model's EOS ids (besides each request's stop ids).
            tenant_salt: cache salt in the block hashes (see ExtraKeys).
        """
        self.runner = runner
        self.block_size = runner.block_size
        self.blocks = runner.blocks
        self.extra = ExtraKeys(runner.model_id, tenant_salt)
        self.sampler = Sampler()
        self.eos_ids = frozenset(runner.arch.eos_token_ids if stop_on_eos else ())
        self.capacity = min(runner.max_model_len, runner.cache.num_blocks * self.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}
        self._hashes: dict[str, list[BlockHash]] = {}
        """Per request: the hashes of its first full blocks, registered so far."""
        self._roots: dict[str, BlockHash] = {}
        """Per-request hash-chain root (requests added with their own tenant_salt)."""
        self.num_preemptions = 0
        self._ids = itertools.count()

    def add_request(
        self,
        request_id: str,
        prompt_ids: SequenceT[int],
        params: SamplingParams | None = None,
        cached_blocks: SequenceT[int] = (),
        tenant_salt: str | None = None,
    ) -> Sequence:
        """Queue a request.

        Args:
            cached_blocks: already-filled blocks (e.g. imported from the store)
                holding the first ``len(cached_blocks) * block_size`` prompt
                tokens; the engine takes over one reference to each.
            tenant_salt: this request's cache salt (its tenant); None: the
                engine's. Requests only share prefix blocks with the same salt.
        Raises:
            ValueError: duplicate id, or a prompt too long for the context or the pool.
        """
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} already in use")
        seq = Sequence(request_id, list(prompt_ids), params or SamplingParams(),
                       arrival_s=time.perf_counter())
        self.runner.check_fits(seq)
        if cached_blocks:
            seq.attach_cached(cached_blocks, len(cached_blocks) * self.block_size)
        self.sequences[request_id] = seq
        self._hashes[request_id] = []
        if tenant_salt is not None:
            self._roots[request_id] = self._root(tenant_salt)
        self.sampler.add(request_id, seq.params)
        self.waiting.append(seq)
        return seq

    def step(self) -> list[StepOutput]:
        """Prefill what fits from the waiting queue, else decode all running requests."""
        outputs = self._prefill_waiting()
        if outputs or not self.running:
            if self.waiting and not self.running:
                raise OutOfBlocksError(
                    f"request {self.waiting[0].request_id!r} does not fit in the free KV blocks"
                )
            return outputs
        self._reserve_decode_blocks()
        logits = self.runner.decode_step(self.running)  # [B, vocab]
        return self._emit(list(self.running), self.sampler.sample(logits, self.running))

    def num_prefix_tokens(self, prompt_ids: SequenceT[int], tenant_salt: str | None = None) -> int:
        """Prompt tokens whose KV this engine's registered blocks already hold (what a
        request for ``prompt_ids`` would find cached here right now; no reference taken)."""
        root = None if tenant_salt is None else self._root(tenant_salt)
        hashes = hash_blocks(list(prompt_ids)[:-1], self.block_size, self.extra, root)
        return len(self.blocks.match(hashes)) * self.block_size

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(
        self,
        prompts: SequenceT[SequenceT[int]],
        params: SamplingParams | SequenceT[SamplingParams] | None = None,
    ) -> list[list[int]]:
        """Run ``prompts`` to completion together; returns each one's output ids."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        request_ids = [f"generate-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, p in zip(request_ids, prompts, params):
            self.add_request(request_id, prompt, p)
        while self.has_unfinished():
            self.step()
        return [self.pop(request_id).output_ids for request_id in request_ids]

    def pop(self, request_id: str) -> Sequence:
        """Forget a finished request and return its sequence."""
        seq = self.sequences[request_id]
        if not seq.finished:
            raise ValueError(f"request {request_id!r} is still running")
        del self.sequences[request_id]
        return seq

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is (waiting, running or finished) and free
        its blocks. Returns False when the id is unknown (already popped)."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.block_table:
            self.runner.free(seq)
        self.sampler.remove(request_id)
        self._hashes.pop(request_id, None)
        self._roots.pop(request_id, None)
        return True

    # ------------------------------------------------------------------ private

    def _prefill_waiting(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        while self.waiting and len(self.running) < self.runner.config.max_batch_size:
            seq = self.waiting[0]
            if not self._reserve_prefill_blocks(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.scheduled_s = time.perf_counter()
            logits = self.runner.prefill(seq)  # [vocab]
            outputs += self._emit([seq], self.sampler.sample(logits[None], [seq]))
            seq.first_token_s = seq.first_token_s or time.perf_counter()
        return outputs

    def _reserve_prefill_blocks(self, seq: Sequence) -> bool:
        """Attach the cached prefix and allocate the rest; False if the pool lacks room."""
        num_blocks = -(-seq.num_tokens // self.block_size)
        if not seq.block_table:
            hashes = hash_blocks(seq.token_ids[: seq.num_tokens - 1], self.block_size,
                                 self.extra, self._roots.get(seq.request_id))
            cached = self.blocks.match(hashes)
            if not self.blocks.can_share(cached, num_blocks - len(cached)):
                return False
            self.blocks.share(cached)
            seq.attach_cached(cached, len(cached) * self.block_size)
            self._hashes[seq.request_id] = hashes[: len(cached)]
        missing = max(num_blocks - len(seq.block_table), 0)
        if not self.blocks.can_allocate(missing):
            return False
        seq.block_table += self.blocks.allocate(missing)
        return True

    def _reserve_decode_blocks(self) -> None:
        """Give each running request room for one more token, preempting the newest if full."""
        for seq in list(self.running):
            while seq in self.running and seq.num_tokens > len(seq.block_table) * self.block_size:
                if self.blocks.can_allocate(1):
                    seq.block_table += self.blocks.allocate(1)
                else:
                    self._preempt(self.running[-1])

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.runner.free(seq)
        seq.num_cached_tokens = 0
        self._hashes[seq.request_id] = []
        self.waiting.appendleft(seq)

    def _emit(self, seqs: list[Sequence], token_ids: list[int]) -> list[StepOutput]:
        outputs = []
        for seq, token_id in zip(seqs, token_ids):
            self._cache_full_blocks(seq)
            seq.append_token(token_id)
            stop_ids = (frozenset(seq.params.stop_token_ids) if seq.params.ignore_eos
                        else self.eos_ids.union(seq.params.stop_token_ids))
            seq.finish_reason = finish_reason(seq, self.capacity, stop_ids)
            if seq.finished:
                self._finish(seq)
            outputs.append(StepOutput(seq.request_id, token_id, seq.finished))
        return outputs

    def _root(self, tenant_salt: str) -> BlockHash:
        return root_hash(ExtraKeys(self.runner.model_id, tenant_salt))

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s newly computed full blocks, chaining on from the last one."""
        hashes = self._hashes[seq.request_id]
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= len(hashes):
            return
        parent = hashes[-1] if hashes else self._roots.get(seq.request_id)
        new = hash_blocks(seq.token_ids[len(hashes) * self.block_size : num_full * self.block_size],
                          self.block_size, self.extra, parent)
        self.blocks.cache_full_blocks(new, seq.block_table[len(hashes) : num_full])
        hashes += new

    def _finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.runner.free(seq)
        self.sampler.remove(seq.request_id)
        del self._hashes[seq.request_id]
        self._roots.pop(seq.request_id, None)
