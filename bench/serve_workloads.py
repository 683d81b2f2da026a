"""bench.serve's workloads: the demo's chats and multi-turn ShareGPT conversations.

A :class:`Conversation` is a system prompt (or none) and the user turns in order;
the runner (bench/serve_runner.py) sends each turn with the history so far, the
model's own answers appended. :class:`PromptFitter` caps a turn's messages to the
context the same way for every system:

    [system | first user+answer] [oldest turns ... dropped] [recent turns] [new user turn]

keeping the system prompt (or, without one, the conversation's first exchange, which
usually states the task), dropping the oldest exchanges after it, and as a last
resort cutting the new user turn's text to what fits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvcluster.demo import MAX_NEW_TOKENS as DEMO_MAX_NEW_TOKENS
from kvcluster.demo import NUM_USERS as DEMO_NUM_USERS
from kvcluster.demo import _personalise
from kvcluster.demo_text import QUESTIONS, SYSTEM_PROMPT

SHAREGPT_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / \
    "sharegpt_multiturn_dev.jsonl"
"""../shared/datasets/ relative to the repository root."""
CONTEXT_MARGIN_TOKENS = 8
"""Room left unused when fitting, against small tokenizer differences between servers."""


@dataclass(frozen=True)
class Conversation:
    name: str
    system: str | None
    user_turns: tuple[str, ...]
    max_tokens: tuple[int, ...]
    """Per turn: the new-token limit sent with it."""

    def __post_init__(self) -> None:
        if len(self.user_turns) != len(self.max_tokens) or not self.user_turns:
            raise ValueError(f"{self.name}: needs one max_tokens per user turn, and a turn")


@dataclass
class FitStats:
    """What :class:`PromptFitter` changed over a workload (reported with its rows)."""

    exchanges_dropped: int = 0
    turns_cut: int = 0
    turns_fitted: int = 0


@dataclass
class PromptFitter:
    """Caps chat prompts to ``max_model_len`` (prompt + max_tokens), counted with the
    model's own tokenizer and chat template (kvcluster.engine.tokenizer)."""

    tokenizer: object
    max_model_len: int
    stats: FitStats = field(default_factory=FitStats)

    def fit(self, messages: list[dict], max_tokens: int) -> list[dict]:
        """``messages`` (system?, then user/assistant alternating, ending in a user turn)
        trimmed so that its prompt and ``max_tokens`` fit the context."""
        budget = self.max_model_len - max_tokens - CONTEXT_MARGIN_TOKENS
        self.stats.turns_fitted += 1
        if self._num_tokens(messages) <= budget:
            return messages
        head, middle, last = _split(messages)
        while middle and self._num_tokens(head + middle + [last]) > budget:
            middle = middle[2:]  # the oldest (user, assistant) exchange
            self.stats.exchanges_dropped += 1
        if self._num_tokens(head + middle + [last]) > budget and head and head[0]["role"] != "system":
            self.stats.exchanges_dropped += 1
            head = []
        fitted = head + middle + [last]
        over = self._num_tokens(fitted) - budget
        if over > 0:
            fitted[-1] = {"role": "user", "content": self._cut(last["content"], over)}
            self.stats.turns_cut += 1
        return fitted

    def _num_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenizer.encode_chat(messages))

    def _cut(self, text: str, num_tokens_over: int) -> str:
        ids = self.tokenizer.encode(text)
        keep = max(1, len(ids) - num_tokens_over - CONTEXT_MARGIN_TOKENS)
        return self.tokenizer.decode(ids[:keep])


def demo_conversations() -> list[Conversation]:
    """`make demo`'s chats: 2 users x 4 turns over the shared system prompt, 32 new tokens
    (run interleaved, turn by turn, as the demo does)."""
    return [Conversation(f"demo-user{user}", SYSTEM_PROMPT,
                         tuple(_personalise(q, user) for q in QUESTIONS),
                         (DEMO_MAX_NEW_TOKENS,) * len(QUESTIONS))
            for user in range(DEMO_NUM_USERS)]


def sharegpt_conversations(path: Path, tokenizer, first: int, count: int, max_turns: int,
                           max_tokens_cap: int, min_max_tokens: int = 8,
                           min_turns: int = 1) -> list[Conversation]:
    """Conversations ``first .. first+count-1`` of the ShareGPT file: each one's human
    turns in order (leading non-human turns skipped), at most ``max_turns`` of them;
    each turn's max_tokens is the length of the dataset's own answer, clamped to
    ``[min_max_tokens, max_tokens_cap]``. With ``min_turns`` > 1, the first ``count``
    records from ``first`` on that have at least that many human turns.

    Raises:
        FileNotFoundError: the file is absent.
    """
    return sharegpt_picks(path, tokenizer, first, count, max_turns, max_tokens_cap,
                          min_max_tokens, min_turns)[0]


def sharegpt_picks(path: Path, tokenizer, first: int, count: int, max_turns: int,
                   max_tokens_cap: int, min_max_tokens: int = 8, min_turns: int = 1
                   ) -> tuple[list[Conversation], int]:
    """:func:`sharegpt_conversations`, and the record index after the last one picked
    (where a later workload's picks start, so that none overlaps this one's)."""
    conversations = []
    next_index = first
    for index, record in enumerate(_records(path)):
        if index < first:
            continue
        if len(conversations) == count:
            break
        next_index = index + 1
        turns = _human_turns(record["conversations"], tokenizer, max_turns)
        if turns and len(turns) >= min_turns:
            conversations.append(Conversation(
                f"sharegpt-{record.get('id', index)}", None, tuple(t for t, _ in turns),
                tuple(min(max(n, min_max_tokens), max_tokens_cap) for _, n in turns)))
    return conversations, next_index


# ------------------------------------------------------------------ private


def _split(messages: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """(the kept head: system or first exchange, the droppable middle, the new turn)."""
    last = messages[-1]
    if messages[0]["role"] == "system":
        return messages[:1], messages[1:-1], last
    return messages[:2] if len(messages) > 2 else [], messages[2:-1], last


def _records(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _human_turns(turns: list[dict], tokenizer, max_turns: int) -> list[tuple[str, int]]:
    """``(human text, tokens of the answer that followed it)`` pairs, in order."""
    start = next((i for i, t in enumerate(turns) if t.get("from") == "human"), len(turns))
    out: list[tuple[str, int]] = []
    for i in range(start, len(turns)):
        if turns[i].get("from") != "human" or not turns[i].get("value", "").strip():
            continue
        answer = turns[i + 1]["value"] if i + 1 < len(turns) and \
            turns[i + 1].get("from") == "gpt" else ""
        out.append((turns[i]["value"], len(tokenizer.encode(answer))))
        if len(out) == max_turns:
            break
    return out
