"""The gRPC binding of :class:`KVReceiver`: a ``grpc.aio`` server (run it on uvloop).

Methods are registered with our own (de)serialisers from
:mod:`kvcluster.proto.convert` (same wire format as the generated stubs, but
chunk payloads are not copied through protobuf objects). The server also
starts the receiver's data planes (``transfer.data_plane``: the tcp listener,
shared-memory windows, a Mooncake engine) and hands them to the receiver.
"""

from __future__ import annotations

import grpc

from kvcluster.common.config import TransferConfig
from kvcluster.proto import convert
from kvcluster.transfer.data_plane.factory import ReceiverDataPlanes, make_receiver_planes
from kvcluster.transfer.heap import keep_heap_warm
from kvcluster.transfer.receiver import KVReceiver, ProtocolError
from kvcluster.transfer.security import ServerSecurity

SERVICE = "kvcluster.v1.KVTransfer"
STREAM_METHOD = f"/{SERVICE}/StreamKV"
INFO_METHOD = f"/{SERVICE}/GetReceiverInfo"


def channel_options(config: TransferConfig) -> list[tuple[str, int]]:
    """Message size limits shared by both ends."""
    return [("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes)]


class TransferServer:
    def __init__(self, receiver: KVReceiver, config: TransferConfig | None = None,
                 security: ServerSecurity | None = None,
                 data_planes: ReceiverDataPlanes | None = None):
        """
        Args:
            data_planes: default: what ``config.data_plane`` serves (TLS as this server).
        """
        self.receiver = receiver
        self.config = config or receiver.config
        self.security = security or ServerSecurity()
        self.data_planes = data_planes or make_receiver_planes(self.config, self.security)
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        """Bind ``config.host:config.port`` (0: a free port) and serve; returns the port."""
        if self.config.heap_trim_threshold_bytes:
            keep_heap_warm(self.config.heap_trim_threshold_bytes)
        server = grpc.aio.server(options=channel_options(self.config))
        server.add_generic_rpc_handlers((self._handlers(),))
        address = f"{self.config.host}:{self.config.port}"
        credentials = self.security.credentials()
        self.port = (server.add_secure_port(address, credentials) if credentials
                     else server.add_insecure_port(address))
        await self.data_planes.start()
        self.receiver.data_planes = self.data_planes
        await server.start()
        self._server = server
        return self.port

    async def stop(self, grace_s: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
            await self.data_planes.stop()

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    # ------------------------------------------------------------ handlers

    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "StreamKV": grpc.stream_stream_rpc_method_handler(
                self._stream_kv,
                request_deserializer=convert.decode_sender_message,
                response_serializer=convert.encode_receiver_message),
            "GetReceiverInfo": grpc.unary_unary_rpc_method_handler(
                self._get_info,
                request_deserializer=lambda data: data,
                response_serializer=convert.encode_info),
        })

    async def _stream_kv(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await self._authenticate(context)

        async def read():
            message = await context.read()
            return None if message is grpc.aio.EOF else message

        try:
            await self.receiver.run_stream(read, context.write)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _get_info(self, request: bytes, context: grpc.aio.ServicerContext):
        await self._authenticate(context)
        return self.receiver.info()

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        if self.security.tenant(context.invocation_metadata()) is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
