"""A receiver in its own process (for the network-cut test, inside a namespace).

    python -m tests.transfer.receiver_proc MODEL_DIR HOST REQUEST_ID NUM_TOKENS SEED DATA_PLANE

Prints ``address HOST:PORT``, waits for REQUEST_ID's KV (prompt(NUM_TOKENS, SEED)
of the tiny model), then prints ``result {json}``: the stream's code, chunks
decoded and recomputed, the grants by plane, and whether the KV in its paged
cache equals a local prefill of the same prompt.
"""

from __future__ import annotations

import json
import sys

import torch
import uvloop

from tests.transfer.conftest import load_levels, make_runner, prefill_kv, prompt, small_config
from tests.transfer.helpers import receiver_node


async def main(model_dir, host, request_id, num_tokens, seed, data_plane) -> None:
    runner = make_runner(model_dir)
    expected = prefill_kv(runner, prompt(num_tokens, seed))
    config = small_config(host=host, chunk_timeout_s=1.0, data_plane=data_plane)
    async with receiver_node(runner, load_levels(), config,
                             prefill_tokens_per_s=1000.0) as node:
        print(f"address {node.server.address}", flush=True)
        received = await node.receiver.wait_result(request_id, 60)
        status = received.status
        print("result " + json.dumps({
            "code": status.code.name, "decoded": status.num_chunks_decoded,
            "recomputed": status.num_chunks_recomputed, "message": status.message,
            "grants": node.receiver.data_plane_stats()["grants"],
            "kv_exact": bool(torch.allclose(node.kv(request_id), expected, rtol=1e-4,
                                            atol=1e-4))}), flush=True)


if __name__ == "__main__":
    model_dir, host, request_id, num_tokens, seed, data_plane = sys.argv[1:7]
    uvloop.run(main(model_dir, host, request_id, int(num_tokens), int(seed), data_plane))
