"""One transfer over the mooncake data plane, in this process (run it inside a private
network namespace: the engine's listeners bind every interface).

    python -m tests.transfer.mooncake_proc MODEL_DIR

Prints ``result {json}``: the plane used, bytes over it, and whether the KV in the
receiver's paged cache is bit-exact.
"""

from __future__ import annotations

import json
import sys

import torch
import uvloop

from kvcluster.transfer.policy import make_policy
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from tests.transfer.conftest import load_levels, make_runner, prefill_kv, prompt, small_config
from tests.transfer.helpers import receiver_node


async def main(model_dir: str) -> None:
    levels = load_levels()
    runner = make_runner(model_dir)
    tokens = prompt(70, seed=17)
    kv = prefill_kv(runner, tokens)
    config = small_config(data_plane="mooncake")
    async with receiver_node(make_runner(model_dir), levels, config) as node:
        async with KVSender(node.server.address, levels, config,
                            policy=make_policy(levels.best, levels.names)) as sender:
            source = ChunkSource(tokens, runner.layout, levels, 16, kv=kv)
            result = await sender.send(source, "m")
            await node.receiver.wait_result("m", 10)
            print("result " + json.dumps({
                "data_plane": result.data_plane, "bytes": result.bytes_sent,
                "data_plane_bytes": result.data_plane_bytes,
                "code": result.status.code.name if result.status else result.error,
                "kv_exact": bool(torch.equal(node.kv("m"), kv))}), flush=True)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
