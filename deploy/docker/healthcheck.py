#!/usr/bin/env python3
"""Exit 0 when a gRPC server reports SERVING over the standard health protocol.

The container's HEALTHCHECK and the Helm chart's exec probes (when TLS is on;
without TLS Kubernetes' native `grpc:` probe is used) and `helm test` run this.
It asks ``grpc.health.v1.Health/Check`` and exits 0 for SERVING, 1 for anything
else (NOT_SERVING, unknown service, refused, timed out, TLS failure), printing why.

    kvcluster-healthcheck [--addr HOST:PORT] [--service NAME] [--timeout S]
                          [--tls-ca CA.pem [--tls-cert CRT --tls-key KEY] [--tls-server-name N]]

Defaults come from KVCLUSTER_HEALTH_ADDR (else 127.0.0.1:50051) and
KVCLUSTER_HEALTH_TIMEOUT (else 3 seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def check(addr: str, service: str = "", timeout_s: float = 3.0, tls_ca: str = "",
          tls_cert: str = "", tls_key: str = "", tls_server_name: str = "") -> tuple[bool, str]:
    """Ask ``addr`` for the health of ``service``; returns (serving, reason)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = _channel(grpc, addr, tls_ca, tls_cert, tls_key, tls_server_name)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        return False, f"{addr}: {exc.code().name}: {exc.details()}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{addr}: {status}"


def _channel(grpc, addr, tls_ca, tls_cert, tls_key, tls_server_name):
    if not tls_ca:
        return grpc.insecure_channel(addr)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    return grpc.secure_channel(addr, creds, options=options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("KVCLUSTER_HEALTH_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--service", default="", help='"" asks for the whole server')
    parser.add_argument("--timeout", type=float,
                        default=float(os.environ.get("KVCLUSTER_HEALTH_TIMEOUT", "3")))
    parser.add_argument("--tls-ca", default="")
    parser.add_argument("--tls-cert", default="")
    parser.add_argument("--tls-key", default="")
    parser.add_argument("--tls-server-name", default="")
    args = parser.parse_args(argv)
    try:
        serving, reason = check(args.addr, args.service, args.timeout, args.tls_ca,
                                args.tls_cert, args.tls_key, args.tls_server_name)
    except OSError as exc:  # unreadable certificate files
        serving, reason = False, str(exc)
    print(("healthy " if serving else "unhealthy ") + reason, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
