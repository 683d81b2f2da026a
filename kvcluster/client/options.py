"""Connection options shared by the sync and asyncio clients."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ClientOptions:
    target: str = "127.0.0.1:50051"
    token: str = ""
    """Bearer token sent as ``authorization: Bearer <token>``; empty: none."""
    tls: bool = False
    root_cert: str = ""
    """PEM file of the CA that signed the server certificate (TLS); empty: system roots."""
    client_cert: str = ""
    client_key: str = ""
    """PEM files for mutual TLS."""
    server_name: str = ""
    """Override the name checked against the server certificate (tests, IP targets)."""
    timeout_s: float | None = 60.0
    """Default deadline of one call, retries included; None: no deadline."""
    max_retries: int = 3
    """Retries on UNAVAILABLE before the first response."""
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    backoff_multiplier: float = 2.0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_cert), private_key=_read(self.client_key),
            certificate_chain=_read(self.client_cert))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def with_target(self, target: str | None) -> "ClientOptions":
        return replace(self, target=target) if target else self

    def backoff_s(self, attempt: int) -> float:
        """Delay before retry ``attempt`` (0-based), capped."""
        return min(self.backoff_max_s, self.backoff_initial_s * self.backoff_multiplier ** attempt)

    def deadline(self, timeout_s: float | None) -> float | None:
        """Monotonic deadline of a call given its timeout (default ``self.timeout_s``)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        return None if timeout_s is None else time.monotonic() + timeout_s

    def should_retry(self, code: grpc.StatusCode, received: bool, attempt: int,
                     deadline: float | None) -> bool:
        """Only UNAVAILABLE, only before any response, within retries and the deadline."""
        if code != grpc.StatusCode.UNAVAILABLE or received or attempt >= self.max_retries:
            return False
        return deadline is None or deadline - time.monotonic() > self.backoff_s(attempt)


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None
