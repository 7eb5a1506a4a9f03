"""Logging: journald fields under systemd, readable text on a terminal.

Structured fields travel through ``logging``'s ``extra=`` with journald's upper-case names
(``EVENT``, ``SESSION_ID``, ...): python-systemd's JournalHandler sends them as journal
fields; the text formatter appends them as ``KEY=value``.
"""

from __future__ import annotations

import logging
import os
import sys

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"
}


class FieldsFormatter(logging.Formatter):
    """``12:00:00.123 INFO tabletd.daemon: call started [EVENT=call_started SESSION_ID=x]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                         datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = {k: v for k, v in record.__dict__.items()
                  if k not in _STANDARD and k.isupper()}
        if fields:
            text += " [" + " ".join(f"{k}={v}" for k, v in sorted(fields.items())) + "]"
        return text


def under_journald() -> bool:
    """True when stderr is the journal stream systemd gave us ($JOURNAL_STREAM = dev:ino)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str) -> None:
    handler: logging.Handler
    if under_journald():
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="tabletd")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(FieldsFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
