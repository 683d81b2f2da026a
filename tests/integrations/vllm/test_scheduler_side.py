"""The connector's scheduler half on vLLM's own scheduler-output types (no engine):
which whole chunks each step saves, the prompt's and then the generated tokens'."""

from __future__ import annotations

import pytest

from kvcluster.common.hashing import ExtraKeys, chunk_hashes
from kvcluster.integrations.vllm.metadata import ConnectorSettings
from kvcluster.integrations.vllm.scheduler_side import SchedulerSide
from tests.integrations.vllm.conftest import vllm_config

from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

BLOCK = 32
CHUNK = 64
MODEL_ID = "m"


@pytest.fixture
def side() -> SchedulerSide:
    config = vllm_config(engine={"block_size": BLOCK}, store={"chunk_tokens": CHUNK})
    return SchedulerSide(ConnectorSettings(config, "d0", MODEL_ID), BLOCK)


def new_step(req_id: str, prompt: list[int], blocks: list[int], scheduled: int
             ) -> SchedulerOutput:
    out = SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [NewRequestData(req_id, prompt, [], None, None, (blocks,), 0, None)]
    out.num_scheduled_tokens = {req_id: scheduled}
    return out


def decode_step(req_id: str, computed: int, new_blocks: list[int] | None) -> SchedulerOutput:
    out = SchedulerOutput.make_empty()
    cached = CachedRequestData.make_empty()
    cached.req_ids = [req_id]
    cached.new_block_ids = [(new_blocks,) if new_blocks else None]
    cached.num_computed_tokens = [computed]
    cached.num_output_tokens = [0]
    out.scheduled_cached_reqs = cached
    out.num_scheduled_tokens = {req_id: 1}
    return out


def keys_of(tokens: list[int]) -> list[bytes]:
    return [k.digest for k in chunk_hashes(tokens, BLOCK, CHUNK, ExtraKeys(MODEL_ID, ""))]


def test_generated_tokens_whole_chunks_are_saved_once_computed(side):
    prompt = list(range(100, 200))  # 100 tokens: one whole chunk of 64
    tokens = list(prompt)  # vLLM's live list: the sampled tokens get appended to it
    side.on_new_request("r", prompt, None, all_token_ids=tokens)
    meta = side.build_meta(new_step("r", prompt, [0, 1, 2, 3], len(prompt)))
    assert [s.chunk_keys for s in meta.saves] == [keys_of(prompt)[:1]]
    assert meta.saves[0].block_ids == [0, 1]
    # decode: token at position p is the input of the step that computes its KV
    saves = []
    for position in range(100, 140):
        tokens.append(1000 + position)  # sampled by the previous step
        saves += side.build_meta(decode_step("r", position, None)).saves
    # chunk 1 (tokens 64..127) is complete once position 127 is computed, not before
    assert len(saves) == 1
    assert saves[0].chunk_keys == keys_of(tokens[:128])[1:2]
    assert saves[0].block_ids == [2, 3]


def test_a_chunk_whose_tokens_vllm_has_not_appended_yet_waits_a_step(side):
    prompt = list(range(64))
    tokens = list(prompt)
    side.on_new_request("r", prompt, None, all_token_ids=tokens)
    side.build_meta(new_step("r", prompt, [0, 1, 2, 3], 64))
    tokens.extend(range(500, 563))  # positions 64..126 known
    # async scheduling: the step computing position 127 is planned before its input
    # token is in the list
    assert side.build_meta(decode_step("r", 127, None)).saves == []
    tokens.append(563)
    saves = side.build_meta(decode_step("r", 128, [4])).saves
    assert [s.chunk_keys for s in saves] == [keys_of(tokens[:128])[1:2]]


def test_without_vllms_token_list_only_the_prompt_is_saved(side):
    prompt = list(range(64))
    side.on_new_request("r", prompt, None)
    side.build_meta(new_step("r", prompt, [0, 1, 2, 3], 64))
    assert all(not side.build_meta(decode_step("r", p, None)).saves for p in range(64, 130))
