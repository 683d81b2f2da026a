"""One OpenAI-compatible streaming chat client for bench.serve, the same for every system.

Per request it sends ``POST /v1/chat/completions`` with ``stream: true`` and
``stream_options.include_usage`` (greedy: temperature 0) and reads the SSE lines::

    data: {choices: [{delta: {role, content: ""}}]}      opening (no content: not a token)
    data: {choices: [{delta: {content: "..."}}]}         content deltas -> TTFT, gaps
    data: {choices: [{delta: {}, finish_reason}], kvcluster: {stage_ms, decode_instance}}
                                                         (kvcluster only)
    data: {choices: [], usage: {completion_tokens, prompt_tokens_details.cached_tokens}}
    data: [DONE]

TTFT is client-side: from just before the request is sent to the first chunk whose
delta has non-empty content. Inter-token gaps are the times between successive
content chunks (a chunk may hold more than one token; both servers send one per
token here). ``stage_ms`` is kvcluster's extension, empty for other servers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class RequestResult:
    """What one chat request measured."""

    conversation: int
    turn: int
    ok: bool = False
    error: str = ""
    sent_s: float = 0.0
    """perf_counter() when the request was sent."""
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    gaps_ms: list[float] = field(default_factory=list)
    """Times between successive content chunks."""
    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)
    """kvcluster's per-stage milliseconds (the ``kvcluster`` extension); {} elsewhere."""
    instance: str = ""
    """Which instance served it: kvcluster's ``decode_instance``, or the server a
    client-side balancer sent it to (bench/serve_rr.py); "" when unknown."""

    @property
    def cached_fraction(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0


class ChatClient:
    """Streams chat completions from one OpenAI-compatible server."""

    def __init__(self, base_url: str, model: str, timeout_s: float = 600.0):
        """
        Args:
            base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
            model: the name the server serves the model under.
        """
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "ChatClient":
        # No connection limit: the workload decides the concurrency; keep-alive reuses
        # connections across a conversation's turns, as SDK clients do.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=self.timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def chat(self, messages: list[dict], max_tokens: int, conversation: int = 0,
                   turn: int = 0) -> RequestResult:
        """One streamed, greedy chat completion; errors are recorded, never raised."""
        result = RequestResult(conversation, turn)
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        result.sent_s = time.perf_counter()
        try:
            async with self._session.post(f"{self.base_url}/chat/completions",
                                          json=body) as response:
                if response.status != 200:
                    result.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                else:
                    await _read_stream(response, result)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: bad JSON
            result.error = f"{type(exc).__name__}: {exc}"[:300]
        result.latency_ms = (time.perf_counter() - result.sent_s) * 1e3
        result.ok = not result.error and result.finish_reason is not None
        if not result.ok and not result.error:
            result.error = "stream ended without a finish reason"
        return result


# ------------------------------------------------------------------ private


async def _read_stream(response: aiohttp.ClientResponse, result: RequestResult) -> None:
    pieces: list[str] = []
    last_content_s: float | None = None
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, SSE comments
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        now = time.perf_counter()
        if "error" in chunk:
            result.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"[:300]
            continue
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                if last_content_s is None:
                    result.ttft_ms = (now - result.sent_s) * 1e3
                else:
                    result.gaps_ms.append((now - last_content_s) * 1e3)
                last_content_s = now
                pieces.append(content)
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
        _read_extensions(chunk, result)
    result.text = "".join(pieces)


def _read_extensions(chunk: dict, result: RequestResult) -> None:
    usage = chunk.get("usage")
    if usage:
        result.num_prompt_tokens = usage.get("prompt_tokens") or 0
        result.num_output_tokens = usage.get("completion_tokens") or 0
        details = usage.get("prompt_tokens_details") or {}
        result.num_cached_tokens = details.get("cached_tokens") or 0
    serving = chunk.get("kvcluster")
    if serving and serving.get("stage_ms"):
        result.stage_ms = {k: float(v) for k, v in serving["stage_ms"].items()}
    if serving and serving.get("decode_instance"):
        result.instance = str(serving["decode_instance"])
