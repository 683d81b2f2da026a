"""The one code -> status table, and worker errors unwrapped from Ray's RayTaskError."""

from __future__ import annotations

import grpc
import pytest

from kvcluster.common import errors
from kvcluster.server import status
from kvcluster.server.cluster_backend import worker_error


@pytest.mark.parametrize("code", errors.CODES)
def test_every_code_is_the_grpc_status_of_its_name(code):
    assert status.grpc_status(code) is grpc.StatusCode[code]


@pytest.mark.parametrize("code, http, kind", [
    (errors.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (errors.UNAUTHENTICATED, 401, "authentication_error"),
    (errors.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (errors.UNAVAILABLE, 503, "service_unavailable"),
    ("NOT_A_CODE", 500, "internal_error"),
])
def test_http_statuses(code, http, kind):
    assert (status.http_status(code), status.openai_error_type(code)) == (http, kind)


def test_worker_error_unwraps_a_kvcluster_error_and_keeps_a_bug_wrapped():
    ray = pytest.importorskip("ray")
    overloaded = errors.OverloadedError("decode worker decode-0 has 8 active requests")
    wrapped = ray.exceptions.RayTaskError("DecodeActor.generate", "Traceback ...", overloaded)
    assert worker_error(wrapped) is overloaded
    bug = ray.exceptions.RayTaskError("DecodeActor.generate", "Traceback ...", KeyError("x"))
    assert worker_error(bug) is bug
