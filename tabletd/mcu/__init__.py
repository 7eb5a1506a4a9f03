"""The power/dock microcontroller (MCU) on the UART (``docs/mcu-protocol.md``).

One module per concern:

- :mod:`tabletd.mcu.codec`: frames and messages, sans-I/O (sections 2, 3 and 6 of the
  protocol document).
- :mod:`tabletd.mcu.link`: acknowledgement, retransmission, duplicate suppression and the
  version handshake, sans-I/O, with time passed in (sections 4 and 5).
- :mod:`tabletd.mcu.pty`: pseudo-terminals and a launcher for the simulated MCU process.

The MCU's camera-rail lease is the enforcement layer that holds when Linux hangs (BRIEF
invariant 3); its rules for firmware are section 7 of the protocol document.
"""
