"""Real worker processes for the fault tests (the tests kill, cut or starve them).

    python -m tests.faults.procs decode CONFIG_JSON
        prints ``address HOST:PORT``, then for each stdin line
        ``REQUEST_ID KV_TIMEOUT_S`` runs a DecodeTask of PROMPT (expect_kv) and
        prints ``result {json}`` (tokens, kv_source, elapsed_s).
    python -m tests.faults.procs prefill CONFIG_JSON
        prints ``ready``, then for each stdin line ``REQUEST_ID TARGET RATE_BPS``
        prefills PROMPT, streams its KV to TARGET through a token bucket at
        RATE_BPS (0: unlimited), printing ``acquire REQUEST_ID N`` before each
        message, and prints ``result {json}`` (transfer_ok, message, levels).

Both are the real worker classes (DecodeWorker / PrefillWorker) with their real
gRPC transfer; only the prefill side's sender gets a pacing shaper so that a
transfer is slow enough to be interrupted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from kvcluster.common.config import ClusterConfig, from_dict
from kvcluster.common.sampling import SamplingParams
from kvcluster.common.tasks import DecodeTask, PrefillTask
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.token_bucket import TokenBucketShaper

PROMPT = tuple((11 * i + 5) % 250 + 3 for i in range(165))  # 10 store chunks, 5 transfer chunks
NEW_TOKENS = 6
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS)


class _PrintingShaper(TokenBucketShaper):
    """A token bucket that announces every message (the test's cue to strike)."""

    def __init__(self, bits_per_s: float, request_id: str):
        super().__init__(bits_per_s, burst_bytes=1024)
        self.request_id = request_id
        self.count = 0

    async def acquire(self, num_bytes: int) -> None:
        print(f"acquire {self.request_id} {self.count}", flush=True)
        self.count += 1
        await super().acquire(num_bytes)


def _emit(kind: str, payload: dict) -> None:
    print(f"{kind} {json.dumps(payload)}", flush=True)


async def _lines():
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip():
            yield line.split()


async def run_decode(config: ClusterConfig) -> None:
    from decode_worker.worker import DecodeWorker

    worker = DecodeWorker(config, "decode-f")
    worker.engine.eos_ids = frozenset()  # random weights: never stop early
    print(f"address {await worker.start()}", flush=True)
    async for request_id, timeout_s in _lines():
        began = time.perf_counter()
        task = DecodeTask(request_id, PROMPT, GREEDY, expect_kv=True,
                          kv_timeout_s=float(timeout_s))
        steps = [step async for step in worker.generate(task)]
        _emit("result", {"id": request_id, "tokens": [s.token_id for s in steps[:-1]],
                         "kv_source": steps[-1].kv_source,
                         "elapsed_s": time.perf_counter() - began})
    await worker.close()


async def run_prefill(config: ClusterConfig) -> None:
    from prefill_worker.worker import PrefillWorker

    worker = PrefillWorker(config, "prefill-f")
    print("ready", flush=True)
    async for request_id, target, rate in _lines():
        shaper = _PrintingShaper(float(rate), request_id) if float(rate) > 0 else None
        worker.senders._senders[target] = KVSender(target, worker.senders.levels,
                                                   config.transfer, shaper=shaper)
        result = await worker.prefill(PrefillTask(request_id, PROMPT, "", target))
        _emit("result", {"id": request_id, "transfer_ok": result.transfer_ok,
                         "message": result.message, "levels": result.levels})
    await worker.close()


def main() -> None:
    role, config_json = sys.argv[1:3]
    config = from_dict(ClusterConfig, json.loads(config_json))
    asyncio.run(run_decode(config) if role == "decode" else run_prefill(config))


if __name__ == "__main__":
    main()
