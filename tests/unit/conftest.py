"""Shared unit-test fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fenceless.blockio import BlockDevice, DirectDevice, MemDevice
from fenceless.ondisk.layout import Layout


@pytest.fixture(params=["mem", "direct"])
def dev(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockDevice]:
    """A control area's worth of device, in memory and as a real file under O_DIRECT.

    Sized from the test module's ``LAYOUT`` (4 hosts if it has none), so the
    code under test meets both the fake and the real alignment rules.
    """
    size = getattr(request.module, "LAYOUT", Layout.compute(4)).total_size()
    d: BlockDevice
    if request.param == "mem":
        d = MemDevice(size)
    else:
        path = tmp_path / "control"
        with open(path, "wb") as f:
            f.truncate(size)
        d = DirectDevice(str(path), writable=True)
    yield d
    d.close()
