import asyncio
import json
import logging

from kvcluster.observability.logs import JsonFormatter, request_context


def _capture():
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(json.loads(JsonFormatter().format(r)))
    log = logging.getLogger("test.logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return log, records


def test_log_lines_carry_the_request_id_across_tasks():
    log, records = _capture()

    async def handle(rid):
        with request_context(rid):
            await asyncio.sleep(0)
            log.info("step %d", 1)

    async def main():
        await asyncio.gather(handle("req-a"), handle("req-b"))

    asyncio.run(main())
    log.info("outside")
    assert sorted(r.get("request_id") for r in records[:2]) == ["req-a", "req-b"]
    assert records[0]["msg"] == "step 1"
    assert "request_id" not in records[2]
