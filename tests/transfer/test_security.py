"""TLS (server auth and mutual) and bearer tokens, with self-signed CAs made here; the
internal credentials (cluster secret, cluster CA) that tenants' credentials never open."""

from __future__ import annotations

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvcluster.common.config import ConfigError, SecurityConfig
from kvcluster.transfer.security import ChannelSecurity, ServerSecurity, internal_token
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from tests.transfer.conftest import make_runner, prefill_kv, prompt, run, small_config
from tests.transfer.helpers import receiver_node


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject, issuer, public_key, signing_key, is_ca: bool, san: str | None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]),
                                        critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write_ca(folder, name: str):
    """A CA and one leaf certificate for ``localhost`` signed by it; returns file paths."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"{name} CA", f"{name} CA", ca_key.public_key(), ca_key, True, None)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("localhost", f"{name} CA", leaf_key.public_key(), ca_key, False, "localhost")
    paths = {k: folder / f"{name}-{k}.pem" for k in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    return {"server": _write_ca(folder, "server"), "client": _write_ca(folder, "client"),
            "other": _write_ca(folder, "other"), "cluster": _write_ca(folder, "cluster")}


@pytest.fixture(scope="module")
def receiver_runner(tiny_dir):
    return make_runner(tiny_dir)


def _send(receiver_runner, sender_runner, levels, server_sec, channel_sec):
    tokens = prompt(32, seed=5)
    kv = prefill_kv(sender_runner, tokens)
    config = small_config(host="127.0.0.1")

    async def main():
        async with receiver_node(receiver_runner, levels, config, security=server_sec) as node:
            target = f"localhost:{node.server.port}"
            async with KVSender(target, levels, config, security=channel_sec) as sender:
                source = ChunkSource(tokens, receiver_runner.layout, levels, 16, kv=kv)
                try:
                    result = await sender.send(source, "sec")
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return result.status.code.name if result.status else result.error

    return run(main())


def test_tls_with_bearer_token_and_client_certificate(pki, receiver_runner, sender_runner,
                                                      levels):
    server = ServerSecurity(pki["server"]["cert"], pki["server"]["key"],
                            tls_client_ca=pki["client"]["ca"], tokens={"s3cret": "tenant-a"})
    good = ChannelSecurity(pki["server"]["ca"], pki["client"]["cert"], pki["client"]["key"],
                           bearer_token="s3cret")
    assert _send(receiver_runner, sender_runner, levels, server, good) == "OK"
    wrong_token = ChannelSecurity(pki["server"]["ca"], pki["client"]["cert"],
                                  pki["client"]["key"], bearer_token="guess")
    assert _send(receiver_runner, sender_runner, levels, server, wrong_token) \
        == grpc.StatusCode.UNAUTHENTICATED
    no_client_cert = ChannelSecurity(pki["server"]["ca"], bearer_token="s3cret")
    assert _send(receiver_runner, sender_runner, levels, server, no_client_cert) \
        == grpc.StatusCode.UNAVAILABLE


def test_tls_rejects_an_untrusted_server_and_plaintext_clients(pki, receiver_runner,
                                                               sender_runner, levels):
    server = ServerSecurity(pki["server"]["cert"], pki["server"]["key"])
    untrusting = ChannelSecurity(pki["other"]["ca"])
    assert _send(receiver_runner, sender_runner, levels, server, untrusting) \
        == grpc.StatusCode.UNAVAILABLE
    assert _send(receiver_runner, sender_runner, levels, server, ChannelSecurity()) \
        == grpc.StatusCode.UNAVAILABLE
    trusting = ChannelSecurity(pki["server"]["ca"])
    assert _send(receiver_runner, sender_runner, levels, server, trusting) == "OK"


def test_bearer_token_without_tls(receiver_runner, sender_runner, levels):
    server = ServerSecurity(tokens={"tok": "t"})
    assert _send(receiver_runner, sender_runner, levels, server,
                 ChannelSecurity(bearer_token="tok")) == "OK"
    assert _send(receiver_runner, sender_runner, levels, server, ChannelSecurity()) \
        == grpc.StatusCode.UNAUTHENTICATED


TENANT_TOKEN = "tenant-token-aaaaaaaa"
CLUSTER_SECRET = "cluster-secret-bbbbbbbbbbbb"


def test_internal_receiver_takes_the_cluster_secret_and_refuses_tenant_tokens(
        receiver_runner, sender_runner, levels):
    security = SecurityConfig(tokens={TENANT_TOKEN: "tenant-a"}, internal_token=CLUSTER_SECRET)
    server = ServerSecurity.internal(security)
    assert _send(receiver_runner, sender_runner, levels, server,
                 ChannelSecurity.internal(security)) == "OK"
    for sender in (ChannelSecurity(bearer_token=TENANT_TOKEN), ChannelSecurity()):
        assert _send(receiver_runner, sender_runner, levels, server, sender) \
            == grpc.StatusCode.UNAUTHENTICATED


def test_internal_secret_from_a_file(tmp_path, receiver_runner, sender_runner, levels):
    path = tmp_path / "internal-token"
    path.write_text(CLUSTER_SECRET + "\n")  # as a Kubernetes Secret file may end
    security = SecurityConfig(internal_token_file=str(path))
    assert internal_token(security) == CLUSTER_SECRET
    assert _send(receiver_runner, sender_runner, levels, ServerSecurity.internal(security),
                 ChannelSecurity(bearer_token=CLUSTER_SECRET)) == "OK"
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        ServerSecurity.internal(security)
    with pytest.raises(ValueError, match="internal_token_file"):
        internal_token(SecurityConfig(internal_token_file=str(tmp_path / "absent")))


def test_internal_mutual_tls_with_the_cluster_ca(pki, receiver_runner, sender_runner, levels):
    """Workers hold certificates from the cluster CA; a tenant's client certificate
    (signed by the front end's client CA) does not get a TLS session."""
    cluster = pki["cluster"]
    security = SecurityConfig(tls_cert=pki["server"]["cert"], tls_key=pki["server"]["key"],
                              tls_ca=pki["client"]["ca"], tokens={TENANT_TOKEN: "tenant-a"},
                              internal_token=CLUSTER_SECRET, internal_tls_cert=cluster["cert"],
                              internal_tls_key=cluster["key"], internal_tls_ca=cluster["ca"])
    server = ServerSecurity.internal(security)
    assert _send(receiver_runner, sender_runner, levels, server,
                 ChannelSecurity.internal(security)) == "OK"
    tenant_cert = ChannelSecurity(cluster["ca"], pki["client"]["cert"], pki["client"]["key"],
                                  bearer_token=CLUSTER_SECRET)
    assert _send(receiver_runner, sender_runner, levels, server, tenant_cert) \
        == grpc.StatusCode.UNAVAILABLE
    cluster_cert_tenant_token = ChannelSecurity(cluster["ca"], cluster["cert"], cluster["key"],
                                                bearer_token=TENANT_TOKEN)
    assert _send(receiver_runner, sender_runner, levels, server, cluster_cert_tenant_token) \
        == grpc.StatusCode.UNAUTHENTICATED
    public_ca = ChannelSecurity(pki["server"]["ca"], cluster["cert"], cluster["key"],
                                bearer_token=CLUSTER_SECRET)
    assert _send(receiver_runner, sender_runner, levels, server, public_ca) \
        == grpc.StatusCode.UNAVAILABLE  # the receiver does not serve the public certificate


@pytest.mark.parametrize("fields, where", [
    ({"internal_token": "short"}, "security.internal_token"),
    ({"internal_token": TENANT_TOKEN, "tokens": {TENANT_TOKEN: "t"}}, "security.internal_token"),
    ({"internal_token": CLUSTER_SECRET, "internal_token_file": "/x"},
     "security.internal_token_file"),
    ({"internal_tls_cert": "c.pem", "internal_tls_key": "k.pem"}, "security.internal_tls_ca"),
])
def test_bad_internal_settings_are_config_errors(fields, where):
    from kvcluster.common.config import ClusterConfig, from_dict

    with pytest.raises(ConfigError) as err:
        from_dict(ClusterConfig, {"security": fields})
    assert err.value.path == where
