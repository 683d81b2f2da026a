"""Client SDK for the kvcluster Generate service: sync and asyncio.

    from kvcluster.client import KVClusterClient, ClientOptions
    from kvcluster.common.sampling import SamplingParams

    with KVClusterClient("127.0.0.1:50051") as client:
        for event in client.generate_stream("Hello", params=SamplingParams(max_new_tokens=16),
                                            timeout_s=30):
            print(event)                   # TokenEvent(token_ids, text) ..., then FinalEvent
        result = client.generate(messages=[{"role": "user", "content": "Hi"}])
        print(result.text, result.final.ttft_ms, result.final.num_cached_tokens)

    # asyncio, TLS and a bearer token
    opts = ClientOptions(target="cluster.example:443", tls=True, root_cert="ca.pem",
                         token="secret", max_retries=5)
    async with AsyncKVClusterClient(options=opts) as client:
        async for event in client.generate_stream("Hello"):
            ...

Calls retry with exponential backoff on UNAVAILABLE until the first response
(never after tokens have arrived); the deadline covers all attempts; breaking
out of a stream cancels the call on the server.
"""

from kvcluster.client.async_client import AsyncKVClusterClient
from kvcluster.client.options import ClientOptions
from kvcluster.client.request import build_request
from kvcluster.client.result import GenerateResult
from kvcluster.client.sync_client import GenerateError, KVClusterClient
from kvcluster.common.requests import ChatMessage, FinalEvent, TokenEvent

__all__ = ["AsyncKVClusterClient", "ChatMessage", "ClientOptions", "FinalEvent",
           "GenerateError", "GenerateResult", "KVClusterClient", "TokenEvent", "build_request"]
