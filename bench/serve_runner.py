"""How bench.serve sends a workload's conversations: the schedules.

    interleaved    one request at a time, turn by turn across conversations (user 0
                   turn 1, user 1 turn 1, user 0 turn 2, ...), as `make demo` does
    closed c=N     N conversations at a time; each sends its turns back to back and the
                   next conversation starts when one ends (N=1: one after another)
    poisson r      conversations start at Poisson times (rate r per second, seeded);
                   each conversation's turns are sequential

Every turn's prompt is the conversation so far (the model's own answers appended),
capped by a :class:`PromptFitter`.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from bench.serve_client import ChatClient, RequestResult
from bench.serve_workloads import Conversation, PromptFitter

SCHEDULES = ("interleaved", "closed", "poisson")


@dataclass(frozen=True)
class Workload:
    name: str
    conversations: tuple[Conversation, ...]
    schedule: str
    concurrency: int = 1
    rate_per_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.schedule == "closed" and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.schedule == "poisson" and self.rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be > 0, got {self.rate_per_s}")

    @property
    def num_requests(self) -> int:
        return sum(len(c.user_turns) for c in self.conversations)


@dataclass
class WorkloadRun:
    workload: str
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0


async def run_workload(client: ChatClient, workload: Workload,
                       fitter: PromptFitter) -> WorkloadRun:
    """Send ``workload`` through ``client``; every request's result is kept."""
    run = WorkloadRun(workload.name)
    began = time.perf_counter()
    if workload.schedule == "interleaved":
        await _interleaved(client, workload, fitter, run)
    elif workload.schedule == "closed":
        await _closed(client, workload, fitter, run)
    else:
        await _poisson(client, workload, fitter, run)
    run.wall_s = time.perf_counter() - began
    return run


class _Chat:
    """One conversation in flight: its history, and the next turn to send."""

    def __init__(self, index: int, conversation: Conversation):
        self.index = index
        self.conversation = conversation
        self.history: list[dict] = ([{"role": "system", "content": conversation.system}]
                                    if conversation.system is not None else [])
        self.turn = 0

    @property
    def done(self) -> bool:
        return self.turn == len(self.conversation.user_turns)

    async def send_next(self, client: ChatClient, fitter: PromptFitter) -> RequestResult:
        max_tokens = self.conversation.max_tokens[self.turn]
        self.history.append({"role": "user", "content": self.conversation.user_turns[self.turn]})
        messages = fitter.fit(list(self.history), max_tokens)
        result = await client.chat(messages, max_tokens, self.index, self.turn)
        # The model's own answer (empty after a failure) is the next turn's history.
        self.history.append({"role": "assistant", "content": result.text.strip()})
        self.turn += 1
        return result

    async def send_all(self, client: ChatClient, fitter: PromptFitter,
                       run: WorkloadRun) -> None:
        while not self.done:
            run.results.append(await self.send_next(client, fitter))


async def _interleaved(client, workload: Workload, fitter, run: WorkloadRun) -> None:
    chats = [_Chat(i, c) for i, c in enumerate(workload.conversations)]
    while any(not chat.done for chat in chats):
        for chat in chats:
            if not chat.done:
                run.results.append(await chat.send_next(client, fitter))


async def _closed(client, workload: Workload, fitter, run: WorkloadRun) -> None:
    queue = [_Chat(i, c) for i, c in enumerate(workload.conversations)]
    queue.reverse()

    async def worker() -> None:
        while queue:
            await queue.pop().send_all(client, fitter, run)

    await asyncio.gather(*(worker() for _ in range(workload.concurrency)))


async def _poisson(client, workload: Workload, fitter, run: WorkloadRun) -> None:
    rng = random.Random(workload.seed)
    tasks = []
    for i, conversation in enumerate(workload.conversations):
        if i:
            await asyncio.sleep(rng.expovariate(workload.rate_per_s))
        tasks.append(asyncio.create_task(_Chat(i, conversation).send_all(client, fitter, run)))
    await asyncio.gather(*tasks)
