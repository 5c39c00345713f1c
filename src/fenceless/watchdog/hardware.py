"""The hardware watchdog (``/dev/watchdog``): the backstop when killing is not enough.

Linux's watchdog API: opening the device starts it; every write (or
WDIOC_KEEPALIVE) pets it; WDIOC_SETTIMEOUT sets its timeout; writing ``V``
before closing disarms it (the "magic close"). The daemon pets it every tick
while nothing is overdue; if work survives a kill it stops, and the machine
resets within the timeout. The timeout is set so that the reset comes before
others may take over: fire at 10N, reset by 10N + timeout < 14N.
"""

from __future__ import annotations

import fcntl
import os
import struct

WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707


class HardwareWatchdog:
    def __init__(self, path: str, timeout: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self.timeout = self._set_timeout(timeout)

    def _set_timeout(self, seconds: int) -> int:
        """Ask for ``seconds``; the device may round. Regular files (tests) keep it."""
        try:
            got = fcntl.ioctl(self.fd, WDIOC_SETTIMEOUT, struct.pack("i", max(1, seconds)))
            return int(struct.unpack("i", got)[0])
        except OSError:
            return seconds

    def pet(self) -> None:
        os.write(self.fd, b"\0")

    def close(self, disarm: bool) -> None:
        """``disarm``: a planned stop with nothing armed (magic close); else leave it
        running, so the machine resets if nobody pets it any more."""
        if disarm:
            os.write(self.fd, b"V")
        os.close(self.fd)
