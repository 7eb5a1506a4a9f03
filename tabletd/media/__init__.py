"""Media: the camera and microphone uplink, the relative's downlink (``docs/protocol.md`` §6).

:mod:`tabletd.media.frames` is the binary frame codec, :mod:`tabletd.media.uplink` the
tablet's bounded uplink buffer; both are sans-I/O. Nothing in this package writes media to
storage (BRIEF invariant 7).
"""
