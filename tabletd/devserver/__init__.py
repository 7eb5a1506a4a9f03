"""REFERENCE SERVER — development and tests only, never installed on a tablet.

A small central server implementing the server side of ``docs/protocol.md`` (version 1):
a development CA (:mod:`.ca`), its SQLite store (:mod:`.store`), the websocket server
(:mod:`.server`) with its media side (:mod:`.media`, :mod:`.recorder`, :mod:`.downlink`)
and the ``tabletd-devserver`` command line (:mod:`.cli`).

Layout of a server directory (``tabletd-devserver init DIR``)::

    DIR/ca.pem, ca.key                  the development CA (device and server certificates)
    DIR/server.pem, server.key          the server's TLS identity (127.0.0.1, localhost)
    DIR/grant_signing.key               Ed25519 key that signs call grants
    DIR/grant_public_key.txt            its public key, 32 raw bytes in base64 (tablet config)
    DIR/store.sqlite                    devices, bookings, commands, events
    DIR/devices/ID/device.pem, .key     one device's identity (plus a copy of ca.pem)
    DIR/recordings/SESSION.ts           a live call's uplink, as received (MPEG-TS)
"""

from tabletd.errors import TabletdError

BANNER = "REFERENCE SERVER — development and tests only, never installed on a tablet"


class DevServerError(TabletdError, RuntimeError):
    """The reference server's directory, store or CA cannot be used as asked.

    The message names the file or the record at fault.
    """


class UnknownRecordError(DevServerError, LookupError):
    """No such device or session in the store (the message names it)."""


__all__ = ["BANNER", "DevServerError", "UnknownRecordError"]
