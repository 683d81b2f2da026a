"""TLS and bearer-token credentials for the two trust domains.

    tenants  --(security.tls_*, security.tokens)-->           front ends (gRPC, HTTP)
    worker   --(security.internal_token, internal_tls_*)-->   worker (KV stream, control)

:meth:`ServerSecurity.from_config` is a front end's: TLS from ``security.tls_cert`` /
``tls_key`` (mutual TLS when ``tls_ca`` is set), tenants from ``security.tokens``.
:meth:`ServerSecurity.internal` and :meth:`ChannelSecurity.internal` are the two ends
of internal traffic: the cluster secret as ``authorization: Bearer ...`` and, when
``internal_tls_*`` are set, mutual TLS where the cluster CA verifies both peers. A
tenant token is never accepted there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvcluster.common.config import SecurityConfig

AUTH_HEADER = "authorization"
INTERNAL_PEER = "<internal>"
"""What :meth:`ServerSecurity.tenant` answers for a caller holding the cluster secret."""


def internal_token(security: SecurityConfig) -> str:
    """The cluster secret: ``internal_token``, else the content of ``internal_token_file``
    (read where the worker runs, stripped), else "" (none configured).

    Raises:
        ValueError: the file is missing, unreadable or empty.
    """
    if not security.internal_token_file:
        return security.internal_token
    path = Path(security.internal_token_file)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"security.internal_token_file {str(path)!r}: {exc}") from exc
    if not token:
        raise ValueError(f"security.internal_token_file {str(path)!r} is empty")
    return token


@dataclass(frozen=True)
class ServerSecurity:
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    """Bearer token -> tenant; empty: no authentication."""

    @classmethod
    def from_config(cls, security: SecurityConfig) -> "ServerSecurity":
        """A front end's: the public certificate and the tenants' tokens."""
        return cls(security.tls_cert, security.tls_key, security.tls_ca, dict(security.tokens))

    @classmethod
    def internal(cls, security: SecurityConfig) -> "ServerSecurity":
        """A worker endpoint's (the KV receiver): the cluster secret and the cluster CA
        only. Neither configured: open (a worker built without a launcher, in tests)."""
        token = internal_token(security)
        return cls(security.internal_tls_cert, security.internal_tls_key,
                   security.internal_tls_ca, {token: INTERNAL_PEER} if token else {})

    @property
    def authenticates(self) -> bool:
        """False when anyone who reaches the port is let in."""
        return bool(self.tokens or self.tls_client_ca)

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
    def internal(cls, security: SecurityConfig) -> "ChannelSecurity":
        """A worker's as a sender: the cluster secret, and its own certificate checked
        against (and checking the receiver with) the cluster CA when configured."""
        return cls(security.internal_tls_ca, security.internal_tls_cert,
                   security.internal_tls_key, security.internal_tls_server_name,
                   internal_token(security))

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
