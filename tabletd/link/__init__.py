"""The central link: protocol v1 (``docs/protocol.md``) over websockets."""
