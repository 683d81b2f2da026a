"""Waiting for a request's KV stream, or for word that it will not come.

A decode worker waits for the prefill worker's stream of a request; if that prefill
fails before it streams, the backend says so (``abandon``) and the wait ends at once
instead of running out its timeout. The native decode worker waits here; a vLLM decode
instance waits inside vLLM's worker process instead (the connector's PDReceiver polls
for the same three outcomes each step).
"""

from __future__ import annotations

import asyncio

from kvcluster.transfer.receiver import KVReceiver


class KVWaits:
    def __init__(self) -> None:
        self._abandoned: dict[str, asyncio.Event] = {}

    def abandon(self, request_id: str) -> None:
        """The sender is gone before streaming (its prefill failed): stop waiting."""
        self._abandoned.setdefault(request_id, asyncio.Event()).set()

    async def wait(self, receiver: KVReceiver, request_id: str, timeout_s: float):
        """The receiver's result for ``request_id``'s stream, or None and why not
        ("sender gone", or nothing within ``timeout_s``)."""
        abandoned = self._abandoned.setdefault(request_id, asyncio.Event())
        waiter = asyncio.ensure_future(receiver.wait_result(request_id, timeout_s))
        giver_up = asyncio.ensure_future(abandoned.wait())
        try:
            await asyncio.wait([waiter, giver_up], return_when=asyncio.FIRST_COMPLETED)
        finally:
            giver_up.cancel()
            self._abandoned.pop(request_id, None)
        if not waiter.done() or waiter.exception() is not None:
            waiter.cancel()
            return None, ("sender gone" if abandoned.is_set() else
                          f"none within {timeout_s:.1f} s")
        return waiter.result(), ""
