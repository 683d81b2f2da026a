"""Request ids stamped onto log records, and a small in-memory tail of recent lines.

``JsonFormatter`` reads the request id from the contextvar when it formats;
a handler that keeps records for later (pytest's caplog, :class:`RecentLogs`)
must stamp the id when the record is emitted, in the emitting context:
:class:`RequestIdFilter` does that. Worker actors keep a :class:`RecentLogs`
tail so a test (or an operator) can ask an actor which request ids its lines
carried, without reading Ray's log files.
"""

from __future__ import annotations

import collections
import logging

from kvcluster.observability.logs import JsonFormatter, current_request_id

WORKER_LOGGERS = ("prefill_worker", "decode_worker", "kvcluster", "router")


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` from the current request context (never drops)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = current_request_id()
        return True


class RecentLogs(logging.Handler):
    """Keeps the last ``capacity`` records as dicts: logger, level, msg, request_id."""

    def __init__(self, capacity: int = 1000, level: int = logging.INFO):
        super().__init__(level)
        self.entries: collections.deque[dict] = collections.deque(maxlen=capacity)
        self.addFilter(RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append({"logger": record.name, "level": record.levelname,
                             "msg": record.getMessage(), "request_id": record.request_id})

    def request_ids(self) -> list[str]:
        """Distinct request ids of the kept lines, oldest first."""
        return list(dict.fromkeys(e["request_id"] for e in self.entries if e["request_id"]))


def install_worker_logging(level: int = logging.INFO) -> RecentLogs:
    """In a worker process: JSON lines on stderr with request ids, plus a tail.

    Returns:
        The tail handler (attached to the worker packages' loggers).
    """
    for handler in logging.getLogger(WORKER_LOGGERS[0]).handlers:
        if isinstance(handler, RecentLogs):  # already installed in this process
            return handler
    tail = RecentLogs(level=level)
    stderr = logging.StreamHandler()
    stderr.setFormatter(JsonFormatter())
    stderr.addFilter(RequestIdFilter())
    for name in WORKER_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(tail)
        logger.addHandler(stderr)
    return tail
