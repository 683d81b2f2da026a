"""SLO-adaptive KV streaming against fixed levels, over real shaped links.

    python -m bench.adaptive [--quick] [--json FILE] [--slo-ms MS] [--shaper auto|tc|token-bucket]
                             [--codec-transform on|off]

Setup (this process): SmolLM2-135M prefills a prompt (the text of Python's
``argparse`` module, tokenized), every chunk is encoded at every codec level
(the sizes on the wire are the codec's real sizes), and the payloads are handed
to a sender process. A receiver process loads SmolLM2 too: it decodes chunks
into its paged KV cache, and recomputes "text" chunks with its real prefill
(its measured speed is what the adaptive policy compares against).

Network: the sender runs in network namespace A, the receiver in namespace B,
joined by a veth pair whose egress in A is limited by ``tc tbf``; the sender
changes the rate before every chunk (one ``tc -batch`` process). Where
namespaces cannot be made, both run on 127.0.0.1 and the sender paces itself
with a token bucket; the output then says ``token-bucket (in-sender)``.

Traces: constant 0.1, 1 and 10 Gbit/s, and "varying", redrawn per chunk
uniformly in 0.1-10 Gbit/s (seeded; every policy sees the same draws).
Policies: adaptive, always lossless, always int8, always the lowest level,
always recompute. TTFT here is the time from the start of a request's transfer
until all of its KV is in the receiver's paged cache (the prompt's KV is
assumed computed or stored already, CacheGen's setting). Quality level: 0 for
the lowest codec level up to N-1 for lossless; recomputed chunks count as N-1.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import parse_args, print_table, write_json

POLICIES = ("adaptive", "lossless", "int8", "lowest", "recompute")
PORT = 50070
SLO_REFERENCE_BPS = 0.75e9
"""Default SLO: the time to move the prompt's int8 bytes at this rate ..."""
FLOOR_FACTOR = 1.5
"""... but at least this multiple of the fastest fixed level's TTFT on an unthrottled link."""
FLOOR_POLICIES = ("lowest", "int8")
"""Candidates for the fastest level on an idle link: the smallest one, or int8, whose
decode is cheapest (with the codec's transform stage the small levels decode ~2x slower)."""
CALIBRATION_REQUESTS = 5
QUICK = dict(context_tokens=512, chunk_tokens=64, varying_adaptive=20, varying_other=10,
             constant=3, recompute=1)
FULL = dict(context_tokens=2048, chunk_tokens=256, varying_adaptive=100, varying_other=40,
            constant=10, recompute=3)


def main(argv=None) -> dict | None:
    args = parse_args(__doc__.splitlines()[0], argv, extra=_flags)
    if args.role == "receiver":
        return _receiver_role(args)
    if args.role == "sender":
        return _sender_role(args)
    return _orchestrate(args)


def _flags(parser) -> None:
    parser.add_argument("--slo-ms", type=float, default=0.0,
                        help="default: the int8 bytes of the whole prompt at 0.75 Gbit/s")
    parser.add_argument("--shaper", choices=("auto", "tc", "token-bucket"), default="auto")
    parser.add_argument("--codec-transform", choices=("on", "off"), default="on",
                        help="codec.transform of the encoded levels (off: plain, ~2x faster decode)")
    parser.add_argument("--data-plane", default="auto",
                        help="transfer.data_plane of both ends (auto: tcp between the two "
                             "namespaces)")
    parser.add_argument("--role", choices=("orchestrator", "receiver", "sender"),
                        default="orchestrator", help="internal: the processes this one starts")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--bind", default="")
    parser.add_argument("--target", default="")
    parser.add_argument("--device", default="")


# ---------------------------------------------------------------- orchestrator


def _orchestrate(args) -> dict:
    from kvcluster.transfer.netns import NetnsPair, netns_available

    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="kv-adaptive-") as workdir:
        meta = _prepare(Path(workdir), sizes, args.slo_ms, args.codec_transform == "on")
        use_tc, why = (False, "token-bucket requested") if args.shaper == "token-bucket" \
            else netns_available()
        if args.shaper == "tc" and not use_tc:
            raise SystemExit(f"tc shaping unavailable: {why}")
        pair = NetnsPair(f"kvb{os.getpid() % 100000}", subnet="10.231.9") if use_tc else None
        try:
            if pair is not None:
                pair.create(bits_per_s=10e9)
            sent = _run_nodes(Path(workdir), pair, args.data_plane)
        finally:
            if pair is not None:
                pair.destroy()
    results = sent.pop("runs")
    meta.update(sent)  # the SLO actually used, the calibration floor
    meta["data_plane"] = args.data_plane
    meta["shaper"] = ("tc tbf on a veth between two network namespaces" if use_tc
                      else f"token-bucket (in-sender) [namespaces unavailable: {why}]")
    return _report(meta, results, args)


def _prepare(workdir: Path, sizes: dict, slo_ms: float, transform: bool = True) -> dict:
    """Prefill, encode every chunk at every level, write the payloads for the sender."""
    import torch

    from kvcluster.engine.sequence import Sequence
    from kvcluster.transfer.source import ChunkSource

    levels, codec_label = _levels(transform)
    runner = _runner(num_tokens=sizes["context_tokens"])
    tokens = _prompt_tokens(sizes["context_tokens"])
    seq = Sequence("prompt", tokens)
    began = time.perf_counter()
    with torch.inference_mode():
        runner.prefill(seq)
    prefill_s = time.perf_counter() - began
    kv = runner.cache.export_blocks(seq.block_table)[:, :, :len(tokens)].clone()
    source = ChunkSource(tokens, runner.layout, levels, sizes["chunk_tokens"], kv=kv)
    encode_s = {}
    for level in levels.names:
        began = time.perf_counter()
        source.encode_all([level])
        encode_s[level] = time.perf_counter() - began
    payloads = {key: source.payload(*key) for key in
                ((i, lv) for i in range(source.num_chunks) for lv in levels.names)}
    total = {lv: sum(len(payloads[(i, lv)]) for i in range(source.num_chunks))
             for lv in levels.names}
    slo_fixed = bool(slo_ms)
    slo_ms = slo_ms or round(1000 * total["int8"] * 8 / SLO_REFERENCE_BPS, 1)
    meta = dict(sizes=sizes, tokens=tokens, layout=runner.layout.identity, levels=levels.names,
                codecs=codec_label, total_bytes=total, encode_s=encode_s, slo_ms=slo_ms,
                slo_fixed=slo_fixed,
                prefill_s=prefill_s, num_chunks=source.num_chunks, kv="SmolLM2-135M prefill")
    with open(workdir / "payloads.pkl", "wb") as f:
        pickle.dump({"meta": meta, "payloads": payloads}, f)
    return meta


def _run_nodes(workdir: Path, pair, data_plane: str = "auto") -> dict:
    here = [sys.executable, "-m", "bench.adaptive", "--workdir", str(workdir),
            "--data-plane", data_plane]
    bind = f"{pair.addr_b if pair else '127.0.0.1'}:{PORT}"
    wrap = (lambda ns, argv: pair.exec_argv(ns, argv)) if pair else (lambda ns, argv: argv)
    receiver = subprocess.Popen(wrap(pair and pair.ns_b, [*here, "--role", "receiver",
                                                          "--bind", bind]),
                                stdout=subprocess.PIPE, text=True)
    try:
        line = receiver.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"receiver failed to start: {line!r}")
        sender_argv = [*here, "--role", "sender", "--target", bind,
                       *(["--device", pair.dev_a] if pair else [])]
        subprocess.run(wrap(pair and pair.ns_a, sender_argv), check=True)
    finally:
        receiver.kill()
        receiver.wait()
    return json.loads((workdir / "results.json").read_text())


def _report(meta: dict, results: list[dict], args) -> dict:
    slo_s = meta["slo_ms"] / 1000
    top = len(meta["levels"]) - 1
    cells, rows = {}, []
    for trace in dict.fromkeys(r["trace"] for r in results):
        for policy in POLICIES:
            runs = [r for r in results if r["trace"] == trace and r["policy"] == policy]
            if not runs:
                continue
            ttft = sorted(r["ttft_s"] for r in runs)
            cell = dict(n=len(runs), ttft_p50_ms=1000 * _pct(ttft, 50),
                        ttft_p99_ms=1000 * _pct(ttft, 99),
                        slo_pct=100 * sum(r["ok"] and r["ttft_s"] <= slo_s for r in runs) / len(runs),
                        mean_level=statistics.mean([q for r in runs for q in r["quality"]] or [0]),
                        failed=sum(not r["ok"] for r in runs),
                        decode_overlap_pct=_overlap_pct(runs))
            cells.setdefault(trace, {})[policy] = cell
            rows.append([trace, policy, cell["n"], cell["ttft_p50_ms"], cell["ttft_p99_ms"],
                         cell["slo_pct"], cell["mean_level"], cell["decode_overlap_pct"]])
    print_table(f"TTFT (KV in the receiver's cache) vs SLO {meta['slo_ms']:.1f} ms; "
                f"{meta['num_chunks']} chunks x {meta['sizes']['chunk_tokens']} tokens; "
                f"quality 0..{top} (lossless = {top}); shaping: {meta['shaper']}",
                ["trace", "policy", "requests", "TTFT p50 ms", "TTFT p99 ms", "% within SLO",
                 "mean level", "% decode overlapped"], rows)
    print_table("Encoded bytes of the whole prompt per level",
                ["level", "bytes", "x lossless", "encode s"],
                [[lv, b, b / meta["total_bytes"][meta["levels"][0]], meta["encode_s"][lv]]
                 for lv, b in meta["total_bytes"].items()])
    varying = cells.get("varying 0.1-10 Gbit/s", {})
    out = dict(meta, cells=cells, quick=args.quick,
               adaptive_slo_pct=varying.get("adaptive", {}).get("slo_pct"),
               int8_slo_pct=varying.get("int8", {}).get("slo_pct"),
               adaptive_mean_level=varying.get("adaptive", {}).get("mean_level"),
               lowest_mean_level=varying.get("lowest", {}).get("mean_level"))
    out.pop("tokens")
    out["varying_runs"] = [r for r in results if r["trace"] == "varying 0.1-10 Gbit/s"]
    out["data_planes_used"] = dict(collections.Counter(r.get("data_plane", "") for r in results))
    print(f"data plane: {meta.get('data_plane')} -> requests by plane {out['data_planes_used']}")
    print(f"SLO {meta['slo_ms']:.1f} ms = max(int8 bytes at {SLO_REFERENCE_BPS / 1e9:g} Gbit/s: "
          f"{meta['bytes_slo_ms']:.1f} ms, {FLOOR_FACTOR} x the fastest fixed level's unthrottled "
          f"TTFT {meta['floor_ms']:.1f} ms = {FLOOR_FACTOR * meta['floor_ms']:.1f} ms)"
          + (" [--slo-ms]" if meta["slo_fixed"] else ""))
    print(f"varying trace: adaptive {out['adaptive_slo_pct']}% within SLO at mean level "
          f"{out['adaptive_mean_level']}; int8 {out['int8_slo_pct']}%; lowest mean level "
          f"{out['lowest_mean_level']}; codecs: {meta['codecs']}")
    write_json(args.json, out)
    return out


# ---------------------------------------------------------------- receiver


def _receiver_role(args) -> None:
    import uvloop

    from kvcluster.common.config import TransferConfig
    from kvcluster.engine.sequence import Sequence
    from decode_worker.paged_sink import PagedCacheSink
    from kvcluster.transfer.receiver import KVReceiver
    from kvcluster.transfer.server import TransferServer

    data = _load(args.workdir)
    levels, _ = _levels()
    runner = _runner(num_tokens=4 * data["meta"]["sizes"]["context_tokens"])
    speed = _measure_prefill(runner, data["meta"]["sizes"]["chunk_tokens"])

    class FreeingSink(PagedCacheSink):
        def close(self, ok: bool) -> None:
            super().close(ok)
            runner.free(self.seq)

    claims: set[asyncio.Task] = set()

    def open_sink(header):
        # Claim the result as a decode task would (the sink frees its blocks on close),
        # so the receiver's unclaimed-result reaper stays quiet.
        claim = asyncio.ensure_future(receiver.wait_result(header.request_id))
        claims.add(claim)
        claim.add_done_callback(claims.discard)
        return FreeingSink(runner, Sequence(header.request_id, list(header.token_ids)), speed)

    host, port = args.bind.rsplit(":", 1)
    config = TransferConfig(host=host, port=int(port), chunk_timeout_s=30.0, timeout_s=60.0,
                            max_pending_chunks=2, decode_threads=2,
                            data_plane=args.data_plane)
    receiver = KVReceiver(runner.layout, levels, open_sink, config, speed)

    async def serve():
        server = TransferServer(receiver, config)
        await server.start()
        print(f"ready {server.port}", flush=True)
        await server.wait_for_termination()

    uvloop.run(serve())


def _measure_prefill(runner, num_tokens: int):
    import torch

    from kvcluster.engine.sequence import Sequence
    from kvcluster.transfer.sink import RecomputeSpeed

    seq = Sequence("warmup", _prompt_tokens(num_tokens))
    began = time.perf_counter()
    with torch.inference_mode():
        runner.prefill(seq)
    runner.free(seq)
    return RecomputeSpeed(num_tokens / (time.perf_counter() - began))


# ---------------------------------------------------------------- sender


def _sender_role(args) -> None:
    import uvloop

    results = uvloop.run(_send_everything(args))
    (Path(args.workdir) / "results.json").write_text(json.dumps(results))


async def _calibrate(args, source, levels, shaper, config, slo_ms: float) -> dict:
    """The machine's floor: the best median TTFT of a fixed level (FLOOR_POLICIES) on
    the unthrottled (10 Gbit/s) link.

    The SLO is raised to ``FLOOR_FACTOR`` x this floor when the bytes-based
    default is below it: an SLO that every level misses on an idle link
    measures the CPU, not the adaptation.
    """
    from kvcluster.transfer.policy import make_policy
    from kvcluster.transfer.sender import KVSender

    shaper.set_rate(10e9)
    medians = {}
    for name in FLOOR_POLICIES:
        if name != "lowest" and name not in levels:
            continue
        async with KVSender(args.target, levels, config,
                            policy=make_policy(name, levels.names)) as sender:
            await sender.send(source, f"calibrate/{name}/warmup", slo_ms)  # first-call costs
            times = [(await sender.send(source, f"calibrate/{name}/{n}", slo_ms)).elapsed_s
                     for n in range(CALIBRATION_REQUESTS)]
        medians[name] = 1000 * statistics.median(times)
    floor_ms = min(medians.values())
    return dict(floor_ms=floor_ms, floor_by_level_ms=medians,
                slo_ms=max(slo_ms, FLOOR_FACTOR * floor_ms), bytes_slo_ms=slo_ms)


async def _send_everything(args) -> list[dict]:
    from kvcluster.common.config import TransferConfig
    from kvcluster.transfer.policy import make_policy
    from kvcluster.transfer.sender import KVSender
    from kvcluster.transfer.shaper import make_shaper
    from kvcluster.transfer.traces import standard_traces

    data = _load(args.workdir)
    meta = data["meta"]
    levels, _ = _levels()
    source = _source(data, levels)
    shaper = make_shaper("tc" if args.device else "token-bucket", 10e9, args.device)
    config = TransferConfig(max_inflight_chunks=1, num_channels=1, timeout_s=60.0,
                            chunk_timeout_s=30.0, data_plane=args.data_plane)
    calibration = await _calibrate(args, source, levels, shaper, config, meta["slo_ms"])
    if meta["slo_fixed"]:  # --slo-ms given: use it as it is
        calibration["slo_ms"] = meta["slo_ms"]
    slo_ms = calibration["slo_ms"]
    print(f"calibration: {calibration}", flush=True)
    runs = []
    for trace in standard_traces(seed=1):
        for policy_name in POLICIES:
            policy = make_policy(policy_name, levels.names, levels.default,
                                 config.bandwidth_safety, config.slo_risk)
            async with KVSender(args.target, levels, config, policy=policy,
                                shaper=shaper) as sender:
                for request_no in range(_num_requests(meta["sizes"], trace, policy_name)):
                    set_rate = _rate_setter(shaper, trace, request_no)
                    set_rate(0)
                    await asyncio.sleep(0.01)  # let the new rate settle before timing starts
                    result = await sender.send(source, f"{trace.name}/{policy_name}/{request_no}",
                                               slo_ms, before_chunk=set_rate)
                    rates = [trace.rate_bps(request_no, i) for i in range(source.num_chunks)]
                    runs.append(_record(trace.name, policy_name, result, levels, rates))
            print(f"{trace.name:>22} {policy_name:>9}: done", flush=True)
    return dict(calibration, runs=runs)


def _rate_setter(shaper, trace, request_no):
    return lambda index: shaper.set_rate(trace.rate_bps(request_no, index))


def _num_requests(sizes: dict, trace, policy: str) -> int:
    if policy == "recompute":
        return sizes["recompute"]
    if trace.constant:
        return sizes["constant"]
    return sizes["varying_adaptive"] if policy == "adaptive" else sizes["varying_other"]


def _record(trace: str, policy: str, result, levels, rates: list[float]) -> dict:
    ok = result.status is not None and result.status.ok
    if not ok:
        print(f"{trace} {policy}: request failed after {result.elapsed_s:.1f} s: "
              f"{result.error or result.status} levels {result.levels}", flush=True)
    status = result.status
    return dict(trace=trace, policy=policy, ttft_s=result.elapsed_s, ok=ok,
                levels=result.levels, quality=[levels.quality(lv) for lv in result.levels if lv],
                error=result.error, decode_s=status.decode_total_s if status else 0.0,
                decode_overlap_s=status.decode_overlap_s if status else 0.0,
                tail_s=result.tail_s, chunks=[_chunk(c, r) for c, r in zip(result.chunks, rates)],
                data_plane=result.data_plane)


def _chunk(record, rate_bps: float) -> dict:
    """One chunk's plan against what happened: for reading misses out of the JSON."""
    wire_s = record.acked_at_s - record.sent_at_s if record.acked_at_s else None
    return dict(level=record.level, bytes=record.num_bytes, budget_ms=1000 * record.budget_s,
                planned_gbps=record.planned_bytes_per_s and 8e-9 * record.planned_bytes_per_s,
                trace_gbps=rate_bps / 1e9, sent_ms=1000 * record.sent_at_s,
                wire_ms=wire_s and 1000 * wire_s)


def _source(data: dict, levels):
    from kvcluster.transfer.source import ChunkSource

    meta = data["meta"]
    layout = _layout_from_identity(meta["layout"])
    source = ChunkSource(meta["tokens"], layout, levels, meta["sizes"]["chunk_tokens"])
    for (index, level), payload in data["payloads"].items():
        source.add_encoded(index, level, payload)
    return source


# ---------------------------------------------------------------- shared


def _levels(transform: bool = True):
    """The codec's levels; their encoders follow ``codec.transform`` (decoders read both)."""
    from kvcluster.common.config import CodecConfig
    from kvstore.codec.factory import level_set

    label = "kvstore.codec" + ("" if transform else " (transform off)")
    return level_set(config=CodecConfig(transform=transform)), label


def _runner(num_tokens: int):
    from kvcluster.common.config import EngineConfig
    from kvcluster.engine.runner import ModelRunner

    config = EngineConfig(block_size=16, num_blocks=num_tokens // 16 + 64,
                          max_model_len=max(8192, num_tokens))
    return ModelRunner.from_pretrained("smollm2", engine_config=config)


def _prompt_tokens(num_tokens: int) -> list[int]:
    import argparse

    from kvcluster.engine.models import resolve_model
    from kvcluster.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(resolve_model("smollm2"))
    ids = tokenizer.encode(inspect.getsource(argparse))
    assert len(ids) >= num_tokens, "prompt text too short"
    return ids[:num_tokens]


def _layout_from_identity(identity: str):
    from kvcluster.common.layout import KVLayout

    layers, heads, dim, block, dtype = identity.split("-")
    return KVLayout(int(layers[1:]), int(heads[1:]), int(dim[1:]), int(block[1:]), dtype)


def _load(workdir: str) -> dict:
    with open(Path(workdir) / "payloads.pkl", "rb") as f:
        return pickle.load(f)


def _overlap_pct(runs: list[dict]) -> float:
    """Share of decode time spent while later chunks were still arriving."""
    total = sum(r.get("decode_s", 0.0) for r in runs)
    return 100 * sum(r.get("decode_overlap_s", 0.0) for r in runs) / total if total else 0.0


def _pct(ordered: list[float], pct: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[min(98, int(pct) - 1)]


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()
