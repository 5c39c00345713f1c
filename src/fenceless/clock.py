"""Injected clocks: lease code never calls ``time`` directly.

Only the local monotonic clock is ever used for lease decisions (it keeps
counting while the process is stopped; docs/design.md, "The stale writer"
and "Clocks"); tests drive the same code with ``FakeClock`` and never sleep
for real.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """CLOCK_MONOTONIC and a real sleep."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to: ``sleep`` advances it instantly.

    ``on_sleep`` (if set) is called after each advance so a test can change
    the disk "while" the code under test waits.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.slept: list[float] = []
        self.on_sleep: list[Callable[[], None]] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        for hook in list(self.on_sleep):
            hook()
