"""sd_notify through systemd-python (READY, STATUS, WATCHDOG, STOPPING)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


class Notifier:
    """Sends ``KEY=value`` lines to $NOTIFY_SOCKET; does nothing when systemd gave none."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))

    def send(self, **fields: str) -> None:
        if not self.enabled:
            return
        from systemd import daemon  # type: ignore[attr-defined]  # untyped C extension

        message = "\n".join(f"{k}={v}" for k, v in fields.items())
        if not daemon.notify(message):
            log.warning("sd_notify failed: %s", message.replace("\n", " "))
