"""The phase contract every operation follows (after Ganeti's logical units).

check_args   pure: refuse bad input before touching anything
lock         take the lease or lock that makes us the only actor
check_prereq read-only: refuse if the world is not as required
execute      make the change (crash points are named inside)
record       write down what was done

A refusal in the first three phases is a UserError: nothing was changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class Operation:
    name = "operation"

    def check_args(self) -> None:
        """Pure checks of the arguments."""

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        yield

    def check_prereq(self) -> None:
        """Read-only checks against the disk and LVM."""

    def execute(self) -> dict[str, Any]:
        raise NotImplementedError

    def record(self, result: dict[str, Any]) -> None:
        """Record the outcome."""

    def run(self) -> dict[str, Any]:
        self.check_args()
        with self.lock():
            self.check_prereq()
            result = self.execute()
            self.record(result)
        return result
