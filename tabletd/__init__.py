"""tabletd: the on-device daemon that enforces the hard end of every video call.

See ``docs/architecture.md`` for the layers and ``README.md`` for operations.
"""

__version__ = "0.1.0"
