"""Logging for `serve` and `engine`: one JSON object a line (default) or plain text, on stderr.

A record's structured fields travel in `extra={"fields": {...}}` (the access log's request fields); both formats
print them. A tiny formatter of our own rather than python-json-logger: it is twenty lines, and the access log
pays for every microsecond of it on the event loop.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FORMATS = ("json", "text")
LEVELS = ("debug", "info", "warning", "error")


_ENCODER = json.JSONEncoder(default=str)  # made once: json.dumps(default=...) builds an encoder every call
_second: tuple[int, str] = (-1, "")  # the last second formatted (strftime is most of a timestamp's cost)


def _timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: 2026-01-02T03:04:05.678Z."""
    global _second
    whole = int(created)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((created - whole) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(line)  # ASCII: a path's control characters cannot break the line


class TextFormatter(logging.Formatter):
    """`time LEVEL logger message key=value ...`; strings quoted as JSON, so no value can forge a new line."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_timestamp(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            text += "".join(f" {k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(fmt: str = "json", level: str = "info") -> None:
    """Every logger (ours, uvicorn's, the libraries') to stderr in `fmt`, at `level` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Nothing we print needs the caller's file and line, thread or process: skip computing them for each record
    # (the logging docs' own advice; the caller lookup walks the stack, and the access log writes a line a request).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if root.level > logging.DEBUG:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its migration chatter at every start
