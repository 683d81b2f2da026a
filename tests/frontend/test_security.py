"""Bearer tokens -> tenants, tenant isolation of the prefix cache (NDSS probe), TLS and mTLS."""

from __future__ import annotations

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvcluster.client import ClientOptions, GenerateError, KVClusterClient
from kvcluster.common.config import SecurityConfig
from kvcluster.common.sampling import SamplingParams
from kvcluster.proto.kvcluster.v1 import generate_pb2 as pb
from tests.frontend.conftest import make_config
from tests.frontend.helpers import call, status_of

SECRET_PROMPT = "Tenant A's confidential system prompt: account 4242, escalate to legal. " * 2
TOKENS = {"token-a": "tenant-a", "token-b": "tenant-b"}


def _bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def _cached(target: str, token: str, tenant_claim: str = "") -> int:
    request = pb.GenerateRequest(prompt=SECRET_PROMPT, max_new_tokens=2, tenant=tenant_claim)
    return call(target, request, metadata=_bearer(token))[1].num_cached_tokens


@pytest.fixture
def auth_server(start_server):
    return start_server(make_config(security=SecurityConfig(tokens=TOKENS)))


@pytest.mark.parametrize("metadata", [(), _bearer("wrong"), (("authorization", "token-a"),)])
def test_missing_or_bad_token_is_unauthenticated(auth_server, metadata):
    code, details = status_of(auth_server.target, pb.GenerateRequest(prompt="hi"),
                              metadata=metadata)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details


def test_ndss_probe_other_tenant_sees_zero_cached_tokens(auth_server):
    assert _cached(auth_server.target, "token-a") == 0
    assert _cached(auth_server.target, "token-a") > 0          # A reuses its own prefix
    # B replays A's exact prompt, even claiming to be A: the token decides the tenant
    assert _cached(auth_server.target, "token-b", tenant_claim="tenant-a") == 0
    assert _cached(auth_server.target, "token-b") > 0          # ... and B reuses its own


def test_without_auth_the_request_tenant_is_the_namespace(shared_server):
    def cached(tenant: str) -> int:
        request = pb.GenerateRequest(prompt=SECRET_PROMPT, max_new_tokens=1, tenant=tenant)
        return call(shared_server.target, request)[1].num_cached_tokens

    assert cached("iso-x") == 0 and cached("iso-x") > 0
    assert cached("iso-y") == 0


# ---------------------------------------------------------------- TLS


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, issuer: str, public_key, signing_key, is_ca: bool):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write_pki(folder, name: str) -> dict[str, str]:
    """A CA and a ``localhost`` leaf signed by it, as PEM files."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"{name} CA", f"{name} CA", ca_key.public_key(), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("localhost", f"{name} CA", key.public_key(), ca_key, False)
    paths = {k: folder / f"{name}-{k}.pem" for k in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frontend-pki")
    return {name: _write_pki(folder, name) for name in ("server", "client", "other")}


def _client(server, pki, **overrides) -> KVClusterClient:
    options = dict(target=server.target, tls=True, root_cert=pki["server"]["ca"],
                   server_name="localhost", max_retries=0, timeout_s=20)
    options.update(overrides)
    return KVClusterClient(options=ClientOptions(**options))


def test_tls_with_token(start_server, pki):
    security = SecurityConfig(tls_cert=pki["server"]["cert"], tls_key=pki["server"]["key"],
                              tokens=TOKENS)
    server = start_server(make_config(security=security))
    with _client(server, pki, token="token-a") as client:
        result = client.generate("over tls", params=SamplingParams(max_new_tokens=3))
    assert len(result.token_ids) == 3
    with _client(server, pki) as client, pytest.raises(GenerateError) as info:
        client.generate("no token")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with _client(server, pki, root_cert=pki["other"]["ca"], token="token-a") as client:
        with pytest.raises(GenerateError) as info:
            client.generate("wrong CA")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    code, _ = status_of(server.target, pb.GenerateRequest(prompt="plaintext"),
                        metadata=_bearer("token-a"), timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE  # a plaintext client cannot talk to it


def test_mutual_tls_requires_a_client_certificate_from_the_ca(start_server, pki):
    security = SecurityConfig(tls_cert=pki["server"]["cert"], tls_key=pki["server"]["key"],
                              tls_ca=pki["client"]["ca"])
    server = start_server(make_config(security=security))
    with _client(server, pki, client_cert=pki["client"]["cert"],
                 client_key=pki["client"]["key"]) as client:
        assert len(client.generate("mtls", params=SamplingParams(max_new_tokens=2)).token_ids) == 2
    for extra in ({}, {"client_cert": pki["other"]["cert"], "client_key": pki["other"]["key"]}):
        with _client(server, pki, **extra) as client, pytest.raises(GenerateError) as info:
            client.generate("rejected")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
