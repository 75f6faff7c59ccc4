"""The log of ``userfaultfd serve``: one line per event, with a timestamp, as text or as JSON.

Both processes of the daemon (the supervisor and the serving process) log to the same stderr, so
every line names the process it comes from."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Literal

Format = Literal["text", "json"]
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


def _utc(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created * 1000) % 1000:03d}Z"
    )


class _Text(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return (
            f"{_utc(record.created)} userfaultfd serve[{self.role} {os.getpid()}]: "
            f"{level}{record.getMessage()}"
        )


class _Json(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "process": self.role,
            "pid": os.getpid(),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry)


def configure(fmt: Format, verbosity: str, role: str) -> None:
    """Log lines of the ``userfaultfd`` loggers go to stderr in format fmt, from level
    verbosity ("quiet": warnings and errors, "normal", "verbose": debug too)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r} is not 'text' or 'json'")
    handler = logging.StreamHandler()
    handler.setFormatter(_Json(role) if fmt == "json" else _Text(role))
    root = logging.getLogger("userfaultfd")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[verbosity])
    root.propagate = False
