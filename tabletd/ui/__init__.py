"""The tablet's screen (issue 6): a local web page served by the status API.

The page itself is static package data next to this module: ``index.html``, ``app.js``,
``app.css`` and one file of texts per language in ``lang/``. The status API serves them on
loopback (:mod:`tabletd.statusapi`); the page reads the status push channel and the
relative's media and never sends anything that is acted upon. ``docs/ui.md`` lists the
screens, their texts and the fault codes.

Here: the assets' bytes and content types, and the stable fault codes the screen shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from tabletd.watchdog import SENSE_READS_OFF, SENSE_READS_ON

LANGUAGES = ("fr", "en")

# name in the URL (below /ui/) -> (file in this package, content type)
_ASSETS: dict[str, tuple[str, str]] = {
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "app.css": ("app.css", "text/css; charset=utf-8"),
    **{f"lang/{lang}.json": (f"lang/{lang}.json", "application/json; charset=utf-8")
       for lang in LANGUAGES},
}
INDEX = ("index.html", "text/html; charset=utf-8")


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


def asset(name: str) -> Asset | None:
    """The asset served at ``/ui/<name>``, or None if there is no such asset. Only the names
    listed above are served: no file name is ever taken from a URL."""
    entry = _ASSETS.get(name)
    return None if entry is None else _read(*entry)


def index() -> Asset:
    """The page itself, served at ``/``."""
    return _read(*INDEX)


def _read(path: str, content_type: str) -> Asset:
    return Asset(resources.files(__package__).joinpath(path).read_bytes(), content_type)


# Stable codes for the fault screen: an engineer looks them up in docs/ui.md ("Fault codes").
FAULT_CODES: dict[str, str] = {SENSE_READS_ON: "E101", SENSE_READS_OFF: "E102"}
UNKNOWN_FAULT = "E199"


def fault_code(detail: str | None) -> str | None:
    """The code of a fault detail (``Daemon.status()["fault"]``); None when there is no fault.
    A detail this table does not know gets ``E199``, never nothing."""
    if detail is None:
        return None
    return FAULT_CODES.get(detail, UNKNOWN_FAULT)
