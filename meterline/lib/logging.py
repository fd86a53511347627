"""Logging for meterline's processes: readable lines, or one JSON object per line.

``METERLINE_LOG_FORMAT=json`` is for a log collector (Loki, CloudWatch, an
ELK stack): each record is one line with ``time``, ``level``, ``logger`` and
``message``, and ``exc_info`` (the formatted traceback) when there is one,
so a traceback never spans lines that a collector would split.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

__all__ = ["JsonFormatter", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON; the time is UTC, ISO 8601, to the millisecond."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            # cached on the record, as logging.Formatter does, for other handlers
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: Literal["text", "json"], level: int = logging.INFO) -> None:
    """Send every logger's records to stderr, in ``log_format``, from ``level`` up.

    Replaces the root logger's handlers, so it can be called again (tests, a
    re-configuration) without duplicating lines.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # a line per webhook request is the client library's chatter: attempts are recorded
    # (GET .../alerts), failures logged by the alerts' sender
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
