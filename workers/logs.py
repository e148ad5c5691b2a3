"""What a worker's log says: lines for operators, not one per judge request.

- The HTTP clients' own INFO lines (httpx's "HTTP Request: POST ...", one per judge call,
  97% of a worker's log) are off: their loggers log WARNING and above only.
- A worker logs a WARNING per item that fails for good, and a WARNING at most once a
  minute while judge calls are being retried (a retry storm: rate limits, a failing
  endpoint), with the counts by reason; internal faults are ERRORs with a traceback.
- ``REWARDQ_LOG_FORMAT=json`` (``rewardq worker --log-format json``) writes one JSON
  object per line, for log pipelines.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

#: Loggers that write a line per HTTP request at INFO.
CHATTY_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "aiohttp.access")

log = logging.getLogger("rewardq.workers.scoring")


def quiet_http_clients() -> None:
    """Keep the HTTP clients' per-request INFO lines out of the worker's log."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def use_json_format(logger: logging.Logger) -> None:
    """Give every handler of ``logger`` the JSON formatter."""
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())


class RetryStormLog:
    """Counts judge-call retries by reason; says so at WARNING at most once per period."""

    def __init__(self, period_s: float = 60.0) -> None:
        self.period_s = period_s
        self._counts: Counter[str] = Counter()
        self._since = time.monotonic()
        self._logged_at = -float("inf")

    def retried(self, reason: str) -> None:
        """Record one retry; log the counts since the last line once a period has passed
        (the first retry of a storm is logged at once)."""
        self._counts[reason] += 1
        now = time.monotonic()
        if now - self._logged_at < self.period_s:
            return
        total = sum(self._counts.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in self._counts.most_common())
        log.warning("judge calls retried %d time(s) in the last %.0f s (%s)", total,
                    now - self._since, reasons)
        self._counts.clear()
        self._since = self._logged_at = now
