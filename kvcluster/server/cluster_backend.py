"""The disaggregated backend: route, prefill on one pool, decode on the other.

    request -> chunk keys -> decode router (prefix held + load) picks D
            -> D already holds the prefix?  yes: D loads it from its kvstore
                                            no:  prefill router picks P;
                                                 P computes/loads and streams
                                                 the KV to D over gRPC
            -> D's continuous batch streams tokens back (Ray streaming generator)

Two routers, one per pool, each fed by its workers' KV events and heartbeats
(relayed through the actors' ``poll`` in the embedded default, every
``poll_interval_s`` and right after each request, so the next turn of a
conversation is routed with the blocks this one stored). A decode
actor that dies mid-generation is replaced: the request resumes on another
decode instance from its prompt plus the tokens already streamed (greedy
output is therefore identical), or fails with a clear error.

Ray restarts a dead actor (``max_restarts=-1``: same name, same handle, a new
process) and its next poll starts its engine again. An actor seen dying (a Ray
actor error from a request or a poll) has its vLLM KV events unwatched at once, which
clears its view in the router (its KV died with it); once it answers again, a new
``pid`` in its ``info()`` is a restart: its handle's info is refreshed and its events
are watched on its new replay address (vLLM's numbering starts over from 0 there).

A worker's :class:`~kvcluster.common.errors.KVClusterError` (a full queue, a
prompt its engine cannot hold) comes out of Ray wrapped in ``RayTaskError``; it
is unwrapped here and raised with its own code, so the client sees
RESOURCE_EXHAUSTED or INVALID_ARGUMENT as in the embedded backend. A full
prefill queue only costs the transfer: the decode worker computes the prompt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import AsyncIterator

from kvcluster.common.config import ClusterConfig
from kvcluster.common.errors import KVClusterError, UnavailableError
from kvcluster.common.hashing import ExtraKeys
from kvcluster.common.requests import FinalEvent, GenerateRequest, TokenEvent
from kvcluster.common.tasks import DecodeStep, DecodeTask, PrefillTask
from kvcluster.observability.metrics import RouterMetrics
from kvcluster.runtime.pools import WorkerHandle, WorkerPools
from kvcluster.server.backend import GenerateBackend
from kvcluster.worker.relay import forward
from router.decision import RouteRequest
from router.router import NoInstanceError, Router

log = logging.getLogger(__name__)

MAX_DECODE_ATTEMPTS = 3


class RayClusterBackend(GenerateBackend):
    def __init__(self, config: ClusterConfig, pools: WorkerPools, model_id: str,
                 prefill_router: Router, decode_router: Router,
                 poll_interval_s: float = 0.5, metrics: RouterMetrics | None = None,
                 kv_events: dict | None = None):
        """``kv_events``: role -> the vLLM event subscriber (router.vllm_subscriber)
        feeding that pool's router, for engine.kind vllm; each instance is watched here,
        and they are closed at close()."""
        self.config = config
        self.kv_events = dict(kv_events or {})
        self.pools = pools
        self.model_id = model_id
        self.routers = {"prefill": prefill_router, "decode": decode_router}
        self.poll_interval_s = poll_interval_s
        self.stats = {"prefill_results": deque(maxlen=10_000), "decode_retries": 0}
        self._poller: asyncio.Task | None = None
        self._poll_locks: dict[str, asyncio.Lock] = {}
        self._unreachable: set[str] = set()
        """Instances whose last poll failed or that were seen dying: their info() is
        read again (a restart?) before they count as reachable."""
        self._events_dropped: set[str] = set()
        """Instances unwatched when seen dying: watched again once they answer."""
        self.metrics = metrics or RouterMetrics()
        for role, router in self.routers.items():
            self.metrics.watch_live(role, lambda r=router: len(r.registry.alive()))

    async def start(self) -> None:
        """Register every instance and start heartbeats + event relay."""
        for handle in self.pools.prefill + self.pools.decode:
            self.routers[handle.role].registry.register(handle.instance_id, handle.address,
                                                        handle.role)
            self._watch_events(handle)
        await self._poll_once()
        self._poller = asyncio.create_task(self._poll_forever())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
        began = time.perf_counter()
        route = self.routers["decode"].request_for(
            request.prompt_token_ids, ExtraKeys(self.model_id, request.tenant),
            request.request_id)
        decode = self._pick("decode", route)
        outputs: list[int] = []
        final: DecodeStep | None = None
        served_by: dict = {}
        first_token_time = 0.0
        for attempt in range(MAX_DECODE_ATTEMPTS):
            try:
                task, prefill = await self._plan(request, route, decode, outputs, attempt)
                route_ms = (time.perf_counter() - began) * 1e3
                async for step in self._decode(decode, task, prefill, request, served_by):
                    if step.finish_reason is not None:
                        final = step
                        break
                    outputs.append(step.token_id)
                    first_token_time = first_token_time or time.time()
                    yield TokenEvent([step.token_id], "")
                break
            except _ActorDied as exc:
                self.stats["decode_retries"] += 1
                self.metrics.decode_retries.inc()
                log.warning("request %s: decode %s died after %d tokens (%s); resuming",
                            request.request_id, decode.instance_id, len(outputs), exc)
                self._seen_dying(decode)
                if attempt + 1 == MAX_DECODE_ATTEMPTS:
                    raise UnavailableError(f"decode workers kept failing: {exc}")
                self.routers["decode"].registry.deregister(decode.instance_id)
                decode = self._pick("decode", route)
        await self._relay_events_of(decode, served_by.get("prefill"))
        stage_ms = dict(final.stage_ms) if final else {}
        stage_ms["route"] = route_ms
        if final and final.first_token_time and first_token_time:
            stage_ms["token_relay"] = max(first_token_time - final.first_token_time, 0.0) * 1e3
        prefill_result = served_by.get("prefill_result")
        if prefill_result is not None:
            stage_ms.update(prefill_result.stage_ms())
        yield FinalEvent(
            finish_reason=(final.finish_reason if final else "length"),
            ttft_ms=(final.first_token_s * 1e3 if final else 0.0),
            prefill_instance=served_by.get("prefill", ""), decode_instance=decode.instance_id,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=final.num_cached_tokens if final else 0,
            num_output_tokens=len(outputs),
            cached_tokens_by_tier=dict(final.cached_tokens_by_tier) if final else {},
            stage_ms=stage_ms)
        log.info("request %s done in %.3f s", request.request_id, time.perf_counter() - began)

    async def healthy(self) -> bool:
        return bool(self.routers["decode"].registry.alive())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for subscriber in self.kv_events.values():
            subscriber.close()
        self.kv_events = {}

    # ------------------------------------------------------------ planning

    def _pick(self, role: str, route: RouteRequest) -> WorkerHandle:
        try:
            decision = self.routers[role].route(route)
        except NoInstanceError as exc:
            raise UnavailableError(f"no live {role} worker: {exc}") from exc
        self.metrics.observe_decision(role, decision)
        return self.pools.by_id(decision.instance_id)

    async def _plan(self, request: GenerateRequest, route: RouteRequest,
                    decode: WorkerHandle, outputs: list[int], attempt: int):
        """The decode task, and the prefill worker that feeds it (None: decode alone)."""
        params = request.params
        if outputs:  # resume: the tokens already streamed become part of the prompt
            from dataclasses import replace

            params = replace(params, max_new_tokens=params.max_new_tokens - len(outputs))
        token_ids = tuple(request.prompt_token_ids) + tuple(outputs)
        use_prefill = (attempt == 0 and self.pools.prefill and route.block_hashes
                       and self._uncached_on(decode, route)
                       > self.config.workers.max_local_prefill_tokens)
        prefill = self._pick_prefill(route) if use_prefill else None
        task = DecodeTask(request.request_id if attempt == 0 else
                          f"{request.request_id}/retry{attempt}", token_ids, params,
                          request.tenant, expect_kv=prefill is not None,
                          kv_timeout_s=self.config.transfer.timeout_s)
        return task, prefill

    def _pick_prefill(self, route: RouteRequest) -> WorkerHandle | None:
        """A prefill instance, or None (the decoder computes) when none is alive."""
        try:
            return self._pick("prefill", route)
        except UnavailableError as exc:
            log.warning("request %s: %s; the decode worker computes the prompt",
                        route.request_id, exc.message)
            return None

    def _uncached_on(self, decode: WorkerHandle, route: RouteRequest) -> int:
        """Tokens of the prompt's whole chunks (what a prefill worker would send) that D
        lacks, per its KV events: D's store keeps every prompt it served."""
        router = self.routers["decode"]
        with router.ingestor.lock:
            slot = router.index.slot_of(decode.instance_id)
            matched = 0
            if slot is not None:
                match = router.index.match(route.block_hashes, router.index.slot_mask([slot]))
                matched = match.matched_blocks(slot)
        return (len(route.block_hashes) - matched) * router.tokens_per_hash

    async def _decode(self, decode: WorkerHandle, task: DecodeTask,
                      prefill: WorkerHandle | None, request: GenerateRequest,
                      served_by: dict) -> AsyncIterator[DecodeStep]:
        """Stream D's steps while P (if any) feeds it; ``served_by`` names the
        prefill instance once its KV was delivered."""
        import ray

        stream = decode.actor.generate.options(num_returns="streaming").remote(task)
        prefill_ref = prefill_done = None
        if prefill is not None:
            prefill_ref = prefill.actor.prefill.remote(PrefillTask(
                task.request_id, task.token_ids, request.tenant, decode.address,
                request.slo_ms))
            prefill_done = asyncio.ensure_future(
                self._collect_prefill(prefill_ref, prefill, decode, task, served_by))
        ended = False
        try:
            async for ref in stream:
                step = await ref
                ended = step.finish_reason is not None
                yield step
            ended = True
        except ray.exceptions.RayActorError as exc:
            raise _ActorDied(str(exc)) from exc
        except ray.exceptions.RayTaskError as exc:  # D raised: no one will take P's KV
            if prefill_ref is not None:
                ray.cancel(prefill_ref)
            raise worker_error(exc) from None
        finally:
            if not ended:  # closed or cancelled here (a client gone): stop D's generator
                _cancel(stream)  # too, which aborts the request in its engine
            if prefill_done is not None:
                await prefill_done

    async def _collect_prefill(self, ref, prefill: WorkerHandle, decode: WorkerHandle,
                               task: DecodeTask, served_by: dict) -> None:
        import ray

        try:
            result = await ref
            self.stats["prefill_results"].append(result)
            served_by["prefill_result"] = result
            if result.transfer_ok:
                served_by["prefill"] = prefill.instance_id
        except ray.exceptions.TaskCancelledError:  # the decoder failed first (see _decode)
            return
        except Exception as exc:  # tell the decoder not to wait: it recomputes instead
            error = worker_error(exc)
            log.warning("request %s: prefill on %s failed (%s: %s); the decode worker "
                        "computes the prompt", task.request_id, prefill.instance_id,
                        getattr(error, "code", type(error).__name__), error)
            try:
                await decode.actor.abandon_kv.remote(task.request_id)
            except Exception:
                pass

    # ------------------------------------------------------------ heartbeats

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self._poll_once()
            except Exception:
                log.exception("heartbeat poll failed")

    async def _relay_events_of(self, decode: WorkerHandle, prefill_id: str | None) -> None:
        """Poll the request's workers now: their KV events reach the routers
        before the client can send its next turn."""
        handles = [decode] + ([self.pools.by_id(prefill_id)] if prefill_id else [])
        if self._poller is None:  # not started (or closing): nothing relays events
            return
        try:  # bounded: a stuck actor must not hold back the final event
            await asyncio.wait_for(self._poll_once(handles), self.poll_interval_s)
        except asyncio.TimeoutError:
            log.warning("events of %s not relayed within %.1f s; the periodic poll will",
                        [h.instance_id for h in handles], self.poll_interval_s)

    async def _poll_once(self, handles: list[WorkerHandle] | None = None) -> None:
        from ray.exceptions import RayActorError

        handles = handles or self.pools.prefill + self.pools.decode
        results = await asyncio.gather(*(self._poll(h) for h in handles),
                                       return_exceptions=True)
        for handle, result in zip(handles, results):
            router = self.routers[handle.role]
            if isinstance(result, BaseException):  # no heartbeat: the TTL retires it
                if handle.instance_id not in self._unreachable:
                    log.warning("%s unreachable: %r", handle.instance_id, result)
                self._unreachable.add(handle.instance_id)
                if isinstance(result, RayActorError):  # died (a timeout may be a busy one)
                    self._seen_dying(handle)
                continue
            if handle.instance_id in self._unreachable:
                if not await self._refresh_info(handle):
                    continue
                log.warning("%s reachable again", handle.instance_id)
                self._unreachable.discard(handle.instance_id)
            load, address = result
            alive = {i.instance_id for i in router.registry.alive()}
            if address and address != handle.address:  # restarted on a new port
                log.warning("%s now receives KV on %s", handle.instance_id, address)
                handle.address = address
                alive.discard(handle.instance_id)
            if handle.instance_id not in alive:
                router.registry.register(handle.instance_id, handle.address, handle.role)
            router.registry.heartbeat(handle.instance_id, load)

    async def _refresh_info(self, handle: WorkerHandle) -> bool:
        """Read an instance's ``info()`` again after it was unreachable or seen dying; a
        new pid is a restart by Ray (a new process: a new engine, empty KV, a vLLM
        replay socket on a new port), whose KV events are then watched anew.

        Returns:
            False when info() does not answer either (it stays unreachable).
        """
        try:
            info = await asyncio.wait_for(handle.actor.info.remote(), self.poll_interval_s * 4)
        except Exception as exc:  # noqa: BLE001 - any failure: still unreachable
            log.debug("%s: info() after being unreachable failed: %r", handle.instance_id, exc)
            return False
        restarted = info.get("pid") != handle.info.get("pid")
        if restarted:
            log.warning("%s restarted (pid %s -> %s)%s", handle.instance_id,
                        handle.info.get("pid"), info.get("pid"),
                        f"; its KV events now replay from {info['kv_events_replay']}"
                        if info.get("kv_events_replay") else "")
        handle.info = info
        if restarted or handle.instance_id in self._events_dropped:
            self._watch_events(handle)
        return True

    def _watch_events(self, handle: WorkerHandle) -> None:
        """Consume the instance's vLLM KV events (its replay address from its info()):
        its view in the router is rebuilt from that engine's replay buffer."""
        subscriber = self.kv_events.get(handle.role)
        replay = handle.info.get("kv_events_replay", "")
        if subscriber is not None and replay:
            subscriber.watch(handle.instance_id, replay)
            self._events_dropped.discard(handle.instance_id)

    def _seen_dying(self, handle: WorkerHandle) -> None:
        """A Ray actor error: its process (and the KV its engine held) is gone, so its
        view is cleared now; its info() is read again before it counts as reachable."""
        self._unreachable.add(handle.instance_id)
        subscriber = self.kv_events.get(handle.role)
        if subscriber is not None and handle.instance_id not in self._events_dropped:
            subscriber.unwatch(handle.instance_id)
            self._events_dropped.add(handle.instance_id)

    async def _poll(self, handle: WorkerHandle) -> tuple:
        """One actor's heartbeat ``(load, address)``; its queued events go to the
        router. One poll per actor at a time, so its batches arrive in order."""
        router = self.routers[handle.role]
        lock = self._poll_locks.setdefault(handle.instance_id, asyncio.Lock())
        async with lock:
            resync = router.bus.take_resync_request(handle.instance_id)
            load, batches, address = await asyncio.wait_for(
                handle.actor.poll.remote(resync), self.poll_interval_s * 4)
            forward(router.bus, batches)
        return load, address


def _cancel(stream) -> None:
    import ray

    try:
        ray.cancel(stream)
    except Exception:  # noqa: BLE001 - its actor is gone: nothing left to stop
        log.debug("cancelling a decode stream failed", exc_info=True)


def worker_error(exc) -> BaseException:
    """What a worker raised, out of Ray's ``RayTaskError``: its own KVClusterError (code
    and message intact, it pickles with them), else ``exc`` itself (a bug: INTERNAL)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, KVClusterError) else exc


class _ActorDied(RuntimeError):
    pass
