"""Small raw-stub helpers for the front-end tests (the SDK is tested through its own API)."""

from __future__ import annotations

import grpc

from kvcluster.common.requests import FinalEvent, TokenEvent
from kvcluster.proto.convert_generate import event_from_proto
from kvcluster.proto.kvcluster.v1 import generate_pb2 as pb
from kvcluster.proto.kvcluster.v1 import generate_pb2_grpc as pb_grpc


def call(target: str, request: pb.GenerateRequest, metadata=(), timeout: float = 30.0,
         channel: grpc.Channel | None = None) -> tuple[list[TokenEvent], FinalEvent]:
    """Run one Generate call to the end; raises grpc.RpcError on a status."""
    own = channel is None
    channel = channel or grpc.insecure_channel(target)
    try:
        events = [event_from_proto(m) for m in
                  pb_grpc.GenerateStub(channel).Generate(request, metadata=metadata,
                                                         timeout=timeout)]
    finally:
        if own:
            channel.close()
    assert isinstance(events[-1], FinalEvent), events[-1]
    assert all(isinstance(e, TokenEvent) for e in events[:-1])
    return events[:-1], events[-1]


def status_of(target: str, request: pb.GenerateRequest, **kwargs) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call expected to fail."""
    try:
        call(target, request, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def token_ids(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)
