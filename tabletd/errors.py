"""The exception hierarchy.

Every error raised on purpose by tabletd derives from :class:`TabletdError`, and also from
the builtin that matches its nature, so callers may catch either (gpiozero's ``exc.py`` habit).
"""

from __future__ import annotations


class TabletdError(Exception):
    """Root of every error tabletd raises on purpose."""


class ConfigError(TabletdError, ValueError):
    """The configuration file is unreadable or invalid.

    ``problems`` lists every problem found, each naming the file, the key and what is wrong,
    so an engineer fixes them all in one pass.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class HardwareError(TabletdError, RuntimeError):
    """A hardware part could not be opened or driven."""


class RailFaultError(HardwareError):
    """The rail-sense input disagrees with the rail-enable output (BRIEF invariant 4)."""


class StateFileError(TabletdError, ValueError):
    """The persisted session state is unreadable; the caller must treat it as "no session"."""


class DaemonNotRunningError(TabletdError, ConnectionError):
    """The local status API did not answer."""
