"""How a finished or streaming answer looks for each endpoint (chat vs text completion).

Streaming, both as OpenAI sends them (one SSE ``data:`` line per chunk)::

    chat:  {delta: {role, content: ""}}  {delta: {content}}*  {delta: {}, finish_reason}
           [{choices: [], usage}]  (stream_options.include_usage)      data: [DONE]
    text:  {text}*  {text: "", finish_reason}  [{choices: [], usage}]  data: [DONE]

The chunk with the finish reason also carries the ``kvcluster`` extension.
"""

from __future__ import annotations

import time

from kvcluster.common.requests import FinalEvent
from kvcluster.server.http.response_models import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    ServingInfo,
    Usage,
)

DONE = b"data: [DONE]\n\n"


def sse(payload_json: str) -> bytes:
    return f"data: {payload_json}\n\n".encode()


class ChatShape:
    def __init__(self, response_id: str, model: str):
        self.id = f"chatcmpl-{response_id}"
        self.model = model
        self.created = int(time.time())

    def whole(self, text: str, final: FinalEvent, usage: Usage) -> ChatCompletion:
        choice = ChatChoice(message=AssistantMessage(content=text),
                            finish_reason=final.finish_reason)
        return ChatCompletion(id=self.id, created=self.created, model=self.model,
                              choices=[choice], usage=usage, kvcluster=ServingInfo.of(final))

    def opening(self) -> list[bytes]:
        return [self._chunk([ChatChunkChoice(delta=Delta(role="assistant", content=""))])]

    def delta(self, text: str) -> bytes:
        return self._chunk([ChatChunkChoice(delta=Delta(content=text))])

    def finish(self, final: FinalEvent) -> bytes:
        choice = ChatChunkChoice(delta=Delta(), finish_reason=final.finish_reason)
        return self._chunk([choice], kvcluster=ServingInfo.of(final))

    def usage(self, usage: Usage) -> bytes:
        return self._chunk([], usage=usage)

    def _chunk(self, choices, **fields) -> bytes:
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                       choices=choices, **fields).model_dump_json())


class CompletionShape:
    def __init__(self, response_id: str, model: str):
        self.id = f"cmpl-{response_id}"
        self.model = model
        self.created = int(time.time())

    def whole(self, text: str, final: FinalEvent, usage: Usage) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=final.finish_reason)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice],
                          usage=usage, kvcluster=ServingInfo.of(final))

    def opening(self) -> list[bytes]:
        return []

    def delta(self, text: str) -> bytes:
        return self._chunk([CompletionChoice(text=text)])

    def finish(self, final: FinalEvent) -> bytes:
        choice = CompletionChoice(text="", finish_reason=final.finish_reason)
        return self._chunk([choice], kvcluster=ServingInfo.of(final))

    def usage(self, usage: Usage) -> bytes:
        return self._chunk([], usage=usage)

    def _chunk(self, choices, **fields) -> bytes:
        return sse(Completion(id=self.id, created=self.created, model=self.model,
                              choices=choices, **fields).model_dump_json())


Shape = ChatShape | CompletionShape
