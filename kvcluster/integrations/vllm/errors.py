"""vLLM's errors as kvcluster's, with the status code the client should see."""

from __future__ import annotations

from vllm.exceptions import GracefulHTTPError, VLLMClientError
from vllm.v1.engine.exceptions import EngineDeadError

from kvcluster.common.errors import (InvalidRequestError, KVClusterError, OverloadedError,
                                     UnavailableError)


def as_kvcluster_error(exc: BaseException) -> KVClusterError | None:
    """Our error for one vLLM raised (None: not one a request can cause, a bug).

    VLLMClientError (a prompt longer than the model, a token id past the vocabulary,
    bad sampling parameters) and a plain ValueError from its input checks are the
    request's fault: INVALID_ARGUMENT. A full queue is RESOURCE_EXHAUSTED; a dead
    engine core is UNAVAILABLE.
    """
    if isinstance(exc, KVClusterError):
        return exc
    if isinstance(exc, (VLLMClientError, ValueError)):
        return InvalidRequestError(str(exc))
    if isinstance(exc, GracefulHTTPError):
        if int(exc.http_status) == 503:
            return OverloadedError(exc.message)
        return KVClusterError(exc.message)
    if isinstance(exc, EngineDeadError):
        return UnavailableError(f"vLLM engine core died: {exc}")
    return None
