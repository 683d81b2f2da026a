"""The scheduler half's PD planning on vLLM's own scheduler-output types (no engine): a
decode request's stream is an async load of exact blocks, a failed stream counts only
what it filled; a prefill request opens its stream on its first step and hands over
each step's whole chunks (chunked prefill)."""

from __future__ import annotations

import pytest

from kvcluster.integrations.vllm.metadata import PD_RECV, PD_SEND, ConnectorSettings
from kvcluster.integrations.vllm.scheduler_side import SchedulerSide
from tests.integrations.vllm.conftest import vllm_config
from tests.integrations.vllm.test_scheduler_side import decode_step, new_step

BLOCK, CHUNK = 32, 64
PROMPT = list(range(500, 500 + 3 * CHUNK + 7))
STREAMED = 3 * CHUNK


@pytest.fixture
def side() -> SchedulerSide:
    config = vllm_config(engine={"block_size": BLOCK}, store={"chunk_tokens": CHUNK},
                         workers={"colocated": False},
                         transfer={"chunk_tokens": CHUNK})
    return SchedulerSide(ConnectorSettings(config, "d0", "m"), BLOCK)


def test_a_streamed_prompt_is_an_async_load_of_the_blocks_vllm_lacks(side):
    side.on_new_request("r", PROMPT, None, {PD_RECV: {"transfer_id": "t", "timeout_s": 5.0,
                                                      "num_tokens": STREAMED}})
    assert side.num_new_matched_tokens("r", 2 * BLOCK) == (STREAMED - 2 * BLOCK, True)
    blocks = [9, 8, 7, 6, 5, 4, 3]
    side.after_alloc("r", blocks, STREAMED - 2 * BLOCK)
    (recv,) = side.build_meta(new_step("x", [], [], 0)).recvs
    assert (recv.request_id, recv.transfer_id, recv.first_token, recv.end_token) == \
        ("r", "t", 2 * BLOCK, STREAMED)
    assert recv.block_ids == [7, 6, 5, 4] and recv.prompt_token_ids == PROMPT[:STREAMED]
    side.on_recv_outcome({5}, {"r"})  # blocks from the third streamed one on: computed
    assert side.lost_tokens("r") == 2 * BLOCK and side.recv_wait_ms("r") > 0
    assert side.request_finished("r") == {"transfer": 2 * BLOCK}


def test_a_prefix_vllm_holds_whole_needs_no_stream(side):
    side.on_new_request("r", PROMPT, None, {PD_RECV: {"transfer_id": "t",
                                                      "num_tokens": STREAMED}})
    assert side.num_new_matched_tokens("r", STREAMED) == (0, False)
    side.after_alloc("r", list(range(7)), 0)
    assert side.build_meta(new_step("x", [], [], 0)).recvs == []


def test_a_prefill_streams_each_steps_whole_chunks(side):
    side.on_new_request("p", PROMPT, None, {PD_SEND: {"transfer_id": "t", "target": "h:1",
                                                      "num_tokens": STREAMED, "slo_ms": 9}})
    blocks = list(range(20, 27))
    first = side.build_meta(new_step("p", PROMPT, blocks, 100)).sends  # chunked prefill
    assert len(first) == 1 and first[0].target == "h:1" and first[0].slo_ms == 9
    assert first[0].token_ids == PROMPT[:STREAMED]
    assert (first[0].first_token, first[0].block_ids) == (0, [20, 21])  # one whole chunk
    second = side.build_meta(decode_step("p", 100, None)).sends  # 101 computed: none new
    assert second == []
    out = decode_step("p", 101, None)
    out.num_scheduled_tokens = {"p": len(PROMPT) - 101}
    (last,) = side.build_meta(out).sends
    assert (last.target, last.first_token, last.block_ids) == ("", CHUNK, [22, 23, 24, 25])
    assert side.build_meta(decode_step("p", len(PROMPT), None)).sends == []


def test_pd_refuses_a_transfer_chunk_that_splits_vllm_blocks():
    config = vllm_config(engine={"block_size": BLOCK}, store={"chunk_tokens": CHUNK},
                         workers={"colocated": False}, transfer={"chunk_tokens": 48})
    with pytest.raises(ValueError, match="transfer.chunk_tokens"):
        SchedulerSide(ConnectorSettings(config, "d0", "m"), BLOCK)
