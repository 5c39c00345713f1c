"""O_DIRECT block I/O, deadlines on hung I/O, and the in-memory test device."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from fenceless.blockio import (
    SECTOR,
    BlockDevice,
    DirectDevice,
    IoError,
    IoTimeout,
    MemDevice,
    TimedIO,
    open_device,
)
from fenceless.errors import ExecError


def _file(tmp_path: Path, sectors: int = 8) -> str:
    path = tmp_path / "dev"
    with open(path, "wb") as f:
        f.truncate(sectors * SECTOR)
    return str(path)


def _devices(tmp_path: Path) -> list[BlockDevice]:
    return [DirectDevice(_file(tmp_path), writable=True), MemDevice(8 * SECTOR),
            TimedIO(MemDevice(8 * SECTOR), 1.0)]


def test_direct_device_uses_o_direct_and_round_trips(tmp_path: Path) -> None:
    path = _file(tmp_path)
    dev = open_device(path, writable=True)
    assert isinstance(dev, DirectDevice)
    try:
        assert fcntl.fcntl(dev._fd, fcntl.F_GETFL) & os.O_DIRECT
        data = bytes(range(256)) * 16
        dev.write(2 * SECTOR, data)
        assert dev.read(2 * SECTOR, SECTOR) == data
        assert dev.read(0, 2 * SECTOR) == bytes(2 * SECTOR)
        other = DirectDevice(path)  # a second opener sees it at once, no cache
        try:
            assert other.read(0, 4 * SECTOR)[2 * SECTOR : 3 * SECTOR] == data
        finally:
            other.close()
    finally:
        dev.close()
    with open(path, "rb") as f:
        f.seek(2 * SECTOR)
        assert f.read(SECTOR) == data


@pytest.mark.parametrize(("offset", "length"), [(1, SECTOR), (512, SECTOR), (0, 512),
                                                (0, 0), (-SECTOR, SECTOR), (0, SECTOR + 1)])
def test_unaligned_requests_are_refused(tmp_path: Path, offset: int, length: int) -> None:
    for dev in _devices(tmp_path):
        with pytest.raises(ValueError, match="multiple of 4096"):
            dev.read(offset, length)
        with pytest.raises(ValueError, match="multiple of 4096"):
            dev.write(offset, b"\0" * length)
        dev.close()


def test_errors_are_exec_errors_naming_the_device(tmp_path: Path) -> None:
    with pytest.raises(IoError, match="open of 0 bytes") as info:
        DirectDevice(str(tmp_path / "missing"))
    assert isinstance(info.value, ExecError)
    assert info.value.exit_code == 3
    path = _file(tmp_path, 2)
    ro = DirectDevice(path)
    try:
        with pytest.raises(IoError, match="opened read-only"):
            ro.write(0, bytes(SECTOR))
        with pytest.raises(IoError, match="short read"):
            ro.read(SECTOR, 2 * SECTOR)
    finally:
        ro.close()
    with pytest.raises(IoError, match="device closed"):
        ro.read(0, SECTOR)


def test_timed_io_abandons_a_hung_request_and_never_waits_for_it() -> None:
    mem = MemDevice(4 * SECTOR)
    dev = TimedIO(mem, 0.05)
    mem.hang()
    t0 = time.monotonic()
    with pytest.raises(IoTimeout, match="on <mem>: write of 4096 bytes at offset 4096 did not"):
        dev.write(SECTOR, b"\x01" * SECTOR)
    assert time.monotonic() - t0 < 1.0
    assert dev.abandoned == 1
    with pytest.raises(IoTimeout):
        dev.read(0, SECTOR)
    assert dev.abandoned == 2
    mem.unhang()  # the kernel lets go: the late write lands, nobody waits for it
    deadline = time.monotonic() + 2
    while dev.abandoned and time.monotonic() < deadline:
        time.sleep(0.005)
    assert dev.abandoned == 0
    assert dev.read(SECTOR, SECTOR) == b"\x01" * SECTOR


def test_timed_io_refuses_new_requests_when_too_many_are_hung() -> None:
    mem = MemDevice(4 * SECTOR)
    dev = TimedIO(mem, 0.01, max_abandoned=2)
    mem.hang()
    try:
        for _ in range(2):
            with pytest.raises(IoTimeout):
                dev.read(0, SECTOR)
        with pytest.raises(IoError, match="2 earlier requests are still hung"):
            dev.read(0, SECTOR)
    finally:
        mem.unhang()


def test_timed_io_passes_device_errors_through() -> None:
    mem = MemDevice(2 * SECTOR)
    dev = TimedIO(mem, 1.0)
    mem.fail_io = True
    with pytest.raises(IoError, match="injected failure"):
        dev.read(0, SECTOR)
    mem.fail_io = False
    with pytest.raises(IoError, match="past the end"):
        dev.read(SECTOR, 2 * SECTOR)


def test_close_waits_for_hung_syscalls_before_releasing_the_fd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = DirectDevice(_file(tmp_path), writable=True)
    release = threading.Event()
    entered = threading.Event()
    real_preadv = os.preadv

    def stuck_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        entered.set()
        release.wait(5)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", stuck_preadv)
    timed = TimedIO(dev, 0.02)
    with pytest.raises(IoTimeout):
        timed.read(0, SECTOR)
    assert entered.wait(1)
    fd = dev._fd
    timed.close()
    os.fstat(fd)  # still open: the fd number cannot be reused under the hung read
    release.set()
    deadline = time.monotonic() + 2
    while timed.abandoned and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_mem_device_tears_writes_at_sector_boundaries() -> None:
    mem = MemDevice(4 * SECTOR)
    mem.tear_next_write(1)
    with pytest.raises(IoError, match="torn write after 1 sectors"):
        mem.write(0, b"\x07" * (3 * SECTOR))
    assert mem.read(0, SECTOR) == b"\x07" * SECTOR
    assert mem.read(SECTOR, 2 * SECTOR) == bytes(2 * SECTOR)
    mem.write(0, b"\x08" * (2 * SECTOR))  # only the next write was torn
    assert mem.read(0, 2 * SECTOR) == b"\x08" * (2 * SECTOR)


def workers() -> int:
    """TimedIO worker threads alive in this process."""
    return sum(1 for t in threading.enumerate() if t.name == "fenceless-io")


def wait_for_workers(count: int) -> None:
    deadline = time.monotonic() + 5
    while workers() > count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert workers() == count


def test_timed_io_reuses_its_worker_and_a_hung_one_is_replaced() -> None:
    before = workers()
    mem = MemDevice(4 * SECTOR)
    timed = TimedIO(mem, 0.2)
    for _ in range(50):
        timed.read(0, SECTOR)
    assert workers() - before == 1
    mem.hang()
    with pytest.raises(IoTimeout):
        timed.read(0, SECTOR)
    mem.unhang()
    assert timed.read(SECTOR, SECTOR) == bytes(SECTOR)  # served by another worker
    deadline = time.monotonic() + 5
    while timed.abandoned and time.monotonic() < deadline:
        time.sleep(0.01)
    assert timed.abandoned == 0
    timed.close()
    wait_for_workers(before)


def test_timed_io_closed_while_a_request_hangs_leaves_no_thread_behind() -> None:
    before = workers()
    mem = MemDevice(4 * SECTOR)
    timed = TimedIO(mem, 0.1)
    mem.hang()
    with pytest.raises(IoTimeout):
        timed.read(0, SECTOR)
    timed.close()  # the hung worker is busy, not idle: it must exit once released
    mem.unhang()
    wait_for_workers(before)
