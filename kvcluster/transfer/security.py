"""TLS and bearer-token options for both ends of a KV stream.

Receiver: TLS from ``security.tls_cert`` / ``tls_key`` (mutual TLS when
``tls_ca`` is set) and bearer tokens from ``security.tokens`` (empty: no
check). Sender: ``transfer.tls_root_cert`` turns TLS on, ``tls_client_*`` add a
client certificate, ``bearer_token`` is sent as ``authorization: Bearer ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvcluster.common.config import SecurityConfig, TransferConfig

AUTH_HEADER = "authorization"


@dataclass(frozen=True)
class ServerSecurity:
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    """Bearer token -> tenant; empty: no authentication."""

    @classmethod
    def from_config(cls, security: SecurityConfig) -> "ServerSecurity":
        return cls(security.tls_cert, security.tls_key, security.tls_ca, dict(security.tokens))

    def credentials(self) -> grpc.ServerCredentials | None:
        """None: serve without TLS."""
        if not self.tls_cert:
            return None
        pair = (_read(self.tls_key), _read(self.tls_cert))
        if self.tls_client_ca:
            return grpc.ssl_server_credentials([pair], root_certificates=_read(self.tls_client_ca),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials([pair])

    def tenant(self, metadata) -> str | None:
        """The caller's tenant, "" when auth is off, None when the token is missing or wrong."""
        if not self.tokens:
            return ""
        for key, value in metadata or ():
            if key == AUTH_HEADER and value.startswith("Bearer "):
                return self.tokens.get(value[len("Bearer "):])
        return None


@dataclass(frozen=True)
class ChannelSecurity:
    root_cert: str = ""
    client_cert: str = ""
    client_key: str = ""
    server_name: str = ""
    bearer_token: str = ""

    @classmethod
    def from_config(cls, transfer: TransferConfig) -> "ChannelSecurity":
        return cls(transfer.tls_root_cert, transfer.tls_client_cert, transfer.tls_client_key,
                   transfer.tls_server_name, transfer.bearer_token)

    @property
    def tls(self) -> bool:
        return bool(self.root_cert)

    def credentials(self) -> grpc.ChannelCredentials:
        client = (_read(self.client_key), _read(self.client_cert)) if self.client_cert else (None, None)
        return grpc.ssl_channel_credentials(_read(self.root_cert), *client)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTH_HEADER, f"Bearer {self.bearer_token}"),) if self.bearer_token else ()


def _read(path: str) -> bytes:
    return Path(path).read_bytes()
