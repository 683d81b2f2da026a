"""Bearer tokens -> tenants on the HTTP API (as on gRPC), tenant isolation, TLS and mTLS."""

from __future__ import annotations

import ssl

import httpx2 as httpx
import openai
import pytest

from kvcluster.common.config import SecurityConfig
from tests.frontend.conftest import make_config
from tests.frontend.test_security import _write_pki
from tests.server.http.conftest import MODEL

TOKENS = {"token-a": "tenant-a", "token-b": "tenant-b"}
SECRET = "Tenant A's confidential system prompt: account 4242, escalate to legal. " * 2


@pytest.fixture
def auth_server(start_http):
    return start_http(make_config(security=SecurityConfig(tokens=TOKENS)))


def _cached(server, token: str) -> int:
    reply = server.client(api_key=token).completions.create(model=MODEL, prompt=SECRET,
                                                             max_tokens=1)
    return reply.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"},
                                     {"authorization": "token-a"}])
def test_missing_or_bad_token_is_401(auth_server, headers):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for method, path, kwargs in (("POST", "completions", {"json": body}),
                                 ("GET", "models", {})):
        resp = httpx.request(method, f"{auth_server.base_url}/{path}", headers=headers, **kwargs)
        assert resp.status_code == 401, resp.text
        assert resp.headers["www-authenticate"] == "Bearer"
        error = resp.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    good = {"authorization": "Bearer token-a"}
    assert httpx.post(f"{auth_server.base_url}/completions", json=body,
                      headers=good).status_code == 200
    assert httpx.get(f"{auth_server.url}/health").status_code == 200  # probes need no token


def test_sdk_with_a_wrong_key_raises_authentication_error(auth_server):
    with pytest.raises(openai.AuthenticationError) as info:
        auth_server.client(api_key="wrong").models.list()
    assert info.value.status_code == 401
    assert [m.id for m in auth_server.client(api_key="token-b").models.list().data][0] == MODEL


def test_other_tenant_sees_zero_cached_tokens(auth_server):
    assert _cached(auth_server, "token-a") == 0
    assert _cached(auth_server, "token-a") > 0
    assert _cached(auth_server, "token-b") == 0  # the token decides the namespace
    assert _cached(auth_server, "token-b") > 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http-pki")
    return {name: _write_pki(folder, name) for name in ("server", "client", "other")}


def _tls_client(server, ca: str, cert: dict | None = None, api_key: str = "token-a"):
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False  # the leaf names localhost; we dial 127.0.0.1
    if cert:
        context.load_cert_chain(cert["cert"], cert["key"])
    return openai.OpenAI(base_url=f"https://127.0.0.1:{server.port}/v1", api_key=api_key,
                         max_retries=0, http_client=openai.DefaultHttpxClient(verify=context))


def test_tls_with_token(start_http, pki):
    security = SecurityConfig(tls_cert=pki["server"]["cert"], tls_key=pki["server"]["key"],
                              tokens=TOKENS)
    server = start_http(make_config(security=security))
    assert server.http.tls
    reply = _tls_client(server, pki["server"]["ca"]).completions.create(
        model=MODEL, prompt="over tls", max_tokens=3)
    assert reply.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        _tls_client(server, pki["server"]["ca"], api_key="nope").models.list()
    with pytest.raises(openai.APIConnectionError):
        _tls_client(server, pki["other"]["ca"]).models.list()  # not our CA
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5)  # plaintext


def test_mutual_tls_requires_a_client_certificate_from_the_ca(start_http, pki):
    security = SecurityConfig(tls_cert=pki["server"]["cert"], tls_key=pki["server"]["key"],
                              tls_ca=pki["client"]["ca"])
    server = start_http(make_config(security=security))
    client = _tls_client(server, pki["server"]["ca"], cert=pki["client"])
    assert client.completions.create(model=MODEL, prompt="mtls", max_tokens=2).choices
    for cert in (None, pki["other"]):
        with pytest.raises(openai.APIConnectionError):
            _tls_client(server, pki["server"]["ca"], cert=cert).models.list()
