"""Real text for the codec benchmarks (nothing is downloaded).

Sources, all shipped on this machine:
  * ``pydoc_data.topics``: the Python Language Reference text that CPython ships
    for ``help()`` (PSF licence), in every CPython install;
  * ``/usr/share/common-licenses/{GPL-3,Apache-2.0}`` when present (Debian).

Documents are these texts as they are. Multi-turn chats are ChatML conversations
in which a user asks about a reference topic and the assistant answers with that
topic's real text, turn after turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydoc_data.topics import topics

LICENSES = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")
TURN_CHARS = 2500
"""Characters of a topic used as one assistant answer."""


@dataclass(frozen=True)
class TextContext:
    kind: str
    """"doc" or "chat"."""
    source: str
    context_ids: list[int]
    continuation_ids: list[int]


def documents() -> list[tuple[str, str]]:
    """(source name, text): reference-manual slices, then the licence texts found."""
    names = sorted(topics)
    out = [(f"pydoc topics {names[0]}..", "\n\n".join(topics[n] for n in names[:40])),
           (f"pydoc topics {names[40]}..", "\n\n".join(topics[n] for n in names[40:]))]
    for path in LICENSES:
        if Path(path).is_file():
            out.append((path, Path(path).read_text(encoding="utf-8")))
    return out


def chat_text(tokenizer, first_topic: int) -> str:
    """A multi-turn ChatML conversation over consecutive reference topics."""
    names = sorted(topics)
    messages = []
    for i in range(first_topic, first_topic + 12):
        name = names[i % len(names)]
        messages.append({"role": "user", "content": f"Can you explain '{name}' in Python?"})
        messages.append({"role": "assistant", "content": topics[name][:TURN_CHARS]})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=False)


def build_contexts(tokenizer, lengths: list[tuple[str, int]], continuation: int,
                   block_size: int) -> list[TextContext]:
    """Contexts of the requested kinds and token counts (rounded down to whole blocks)."""
    docs = documents()
    out, doc_i, chat_i = [], 0, 0
    for kind, length in lengths:
        if kind == "doc":
            source, text = docs[doc_i % len(docs)]
            doc_i += 1
        else:
            source, text = f"chat over pydoc topics from #{chat_i * 12}", chat_text(tokenizer, chat_i * 12)
            chat_i += 1
        out.append(_context(kind, source, tokenizer.encode(text), length, continuation, block_size))
    return out


HELD_OUT = [("doc", 1, 8000, 2048), ("doc", 0, 12000, 1024), ("chat", 60, 0, 2048),
            ("chat", 84, 0, 1024)]
"""(kind, document index or first chat topic, first token, tokens) of texts that neither
the quality bench's contexts (documents from token 0, chats over topics 0-35) nor the
profile's calibration (bench/codec_calibrate.py) use: a check that what was placed on
the bench's own contexts (levels, HINT_GAIN) holds elsewhere."""


def held_out_contexts(tokenizer, continuation: int, block_size: int) -> list[TextContext]:
    """The HELD_OUT texts as contexts (rounded down to whole blocks)."""
    docs = documents()
    out = []
    for kind, which, first, length in HELD_OUT:
        if kind == "doc":
            source, text = f"{docs[which][0]} from token {first}", docs[which][1]
        else:
            source, text = f"chat over pydoc topics from #{which}", chat_text(tokenizer, which)
        out.append(_context(kind, source, tokenizer.encode(text)[first:], length, continuation,
                            block_size))
    return out


def _context(kind: str, source: str, ids: list[int], length: int, continuation: int,
             block_size: int) -> TextContext:
    """``ids`` cut into a context of at most ``length`` tokens (whole blocks) and what follows."""
    length = min(length, len(ids) - continuation) // block_size * block_size
    return TextContext(kind, source, ids[:length], ids[length:length + continuation])
