"""The error root: every error keeps its code and message across pickling (Ray)."""

from __future__ import annotations

import pickle

import pytest

from kvcluster.common import errors


@pytest.mark.parametrize("error, code", [
    (errors.KVClusterError("bug"), errors.INTERNAL),
    (errors.KVClusterError("gone", errors.NOT_FOUND), errors.NOT_FOUND),
    (errors.InvalidRequestError("bad"), errors.INVALID_ARGUMENT),
    (errors.OverloadedError("full"), errors.RESOURCE_EXHAUSTED),
    (errors.RateLimitedError("slow down"), errors.RESOURCE_EXHAUSTED),
    (errors.UnavailableError("down"), errors.UNAVAILABLE),
])
def test_errors_pickle_with_their_class_code_and_message(error, code):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (copy.code, copy.message, str(copy)) == (code, error.message, error.message)


def test_unknown_code_is_refused():
    with pytest.raises(ValueError, match="unknown status code 'TEAPOT'"):
        errors.KVClusterError("x", "TEAPOT")
