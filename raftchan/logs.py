"""How a node's log lines look: plain text for people, or one JSON object per line.

JSON lines carry ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
``message`` and ``node`` (the node's name), plus ``exception`` (the formatted traceback)
when the record has one and ``stack`` when it has a stack. Newlines inside any value are
escaped by the JSON encoding, so every record stays on one line whatever it says.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import types
from datetime import datetime, timezone
from typing import Any

#: The values of ``raftchan node --log-format``.
LOG_FORMATS = ("text", "json")

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

logger = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object on one line (see the module docstring)."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.node is not None:
            entry["node"] = self.node
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a message argument of any type must never cost the line.
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text", node: str | None = None) -> None:
    """Send this process's log records to stderr at ``level``, as text or as JSON lines.

    With ``"json"`` the warnings module and uncaught exceptions (of the main thread and of
    other threads, such as pysyncobj's) are logged too, so that what a node says about a
    crash stays machine-readable. Raises ValueError for an unknown ``log_format``.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(node))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if log_format == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(
    kind: type[BaseException], value: BaseException, traceback: types.TracebackType | None
) -> None:
    logger.critical("uncaught exception", exc_info=(kind, value, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # what the default hook does too
    name = args.thread.name if args.thread is not None else "unknown"
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    logger.critical("uncaught exception in thread %s", name, exc_info=exc_info)
