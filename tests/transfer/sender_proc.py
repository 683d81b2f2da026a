"""A sender in its own process, for the failure tests (the test kills or stops it).

    python -m tests.transfer.sender_proc MODEL_DIR TARGET REQUEST_ID NUM_TOKENS SEED RATE_BPS \
        [DATA_PLANE]

Prefills the tiny model, then streams the KV (lossless) through an in-sender
token bucket at RATE_BPS so that the stream is slow enough to be interrupted, over
``transfer.data_plane`` DATA_PLANE (default "auto").
Prints ``sending <i>`` before each chunk (flushed), then ``done <code>``.
"""

from __future__ import annotations

import sys

import uvloop

from kvcluster.transfer.policy import make_policy
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from kvcluster.transfer.token_bucket import TokenBucketShaper
from tests.transfer.conftest import load_levels, make_runner, prefill_kv, prompt, small_config


async def main(model_dir, target, request_id, num_tokens, seed, rate_bps,
               data_plane="auto") -> None:
    levels = load_levels()
    runner = make_runner(model_dir)
    tokens = prompt(num_tokens, seed)
    kv = prefill_kv(runner, tokens)
    config = small_config(max_inflight_chunks=1, data_plane=data_plane)
    source = ChunkSource(tokens, runner.layout, levels, config.chunk_tokens, kv=kv)
    shaper = TokenBucketShaper(rate_bps, burst_bytes=1024)
    async with KVSender(target, levels, config, policy=make_policy(levels.best, levels.names),
                        shaper=shaper) as sender:
        result = await sender.send(source, request_id,
                                   before_chunk=lambda i: print(f"sending {i}", flush=True))
    print(f"done {result.status.code.name if result.status else result.error} "
          f"{result.data_plane}", flush=True)


if __name__ == "__main__":
    model_dir, target, request_id, num_tokens, seed, rate = sys.argv[1:7]
    uvloop.run(main(model_dir, target, request_id, int(num_tokens), int(seed), float(rate),
                    *sys.argv[7:8]))
