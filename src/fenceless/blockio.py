"""Block I/O on the control area: the only module that opens devices with O_DIRECT.

Every decision the lease and ledger code takes must rest on what is on the
disk now, never on a page cache (docs/design.md, "Caches"), so reads and
writes go through ``O_DIRECT|O_SYNC`` with page-aligned buffers. All I/O is
whole 4 KiB sectors: we assume that an aligned 4 KiB write is atomic
(docs/design.md, "Sector atomicity") and nothing smaller is ever written.

A SAN path can hang a syscall forever, uninterruptibly (docs/design.md, "I/O
that never returns"). ``TimedIO`` runs each request in its own worker thread,
waits at most a deadline, and then abandons it: the caller gets ``IoTimeout``
and carries on, the worker keeps its own fresh buffer until the kernel lets
go, and nothing ever waits for it.

Domain code receives a ``BlockDevice`` (or an opener such as ``open_device``)
and never opens devices itself, so tests can hand it a ``MemDevice`` with
injected faults.
"""

from __future__ import annotations

import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from fenceless.errors import ExecError

SECTOR = 4096

T = TypeVar("T")


class IoError(ExecError):
    """I/O error on {path}: {op} of {length} bytes at offset {offset} failed: {detail}"""


class IoTimeout(IoError):
    """I/O timeout on {path}: {op} of {length} bytes at offset {offset} did not complete \
within {timeout:.3f}s; it was abandoned and its result will be ignored"""


class BlockDevice(Protocol):
    """Sector-granular storage: offsets and lengths are multiples of ``SECTOR``."""

    @property
    def path(self) -> str: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def close(self) -> None: ...


def check_aligned(offset: int, length: int) -> None:
    """Refuse unaligned requests before they reach the device (O_DIRECT would EINVAL)."""
    if offset < 0 or offset % SECTOR:
        raise ValueError(f"offset {offset} is not a non-negative multiple of {SECTOR}")
    if length <= 0 or length % SECTOR:
        raise ValueError(f"length {length} is not a positive multiple of {SECTOR}")


class DirectDevice:
    """A block device or regular file opened with ``O_DIRECT|O_SYNC``.

    Each call allocates its own ``mmap`` buffer (page-aligned, as O_DIRECT
    needs), so a request abandoned by ``TimedIO`` never shares memory with a
    later one. The file descriptor is closed only when no request is still in
    flight: closing it under a hung request could let the fd number be reused
    and a late write land on some other file.
    """

    def __init__(self, path: str, writable: bool = False) -> None:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_DIRECT | os.O_SYNC
        flags |= os.O_CLOEXEC
        self._path = path
        self.writable = writable
        try:
            self._fd = os.open(path, flags)
        except OSError as exc:
            raise IoError(
                path=path, op="open", length=0, offset=0, detail=exc.strerror or str(exc)
            ) from exc
        self._lock = threading.Lock()
        self._inflight = 0
        self._closing = False

    @property
    def path(self) -> str:
        return self._path

    def _enter(self, op: str, offset: int, length: int) -> None:
        with self._lock:
            if self._closing:
                raise IoError(
                    path=self._path, op=op, length=length, offset=offset, detail="device closed"
                )
            self._inflight += 1

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._closing and self._inflight == 0:
                os.close(self._fd)

    def read(self, offset: int, length: int) -> bytes:
        check_aligned(offset, length)
        self._enter("read", offset, length)
        try:
            with mmap.mmap(-1, length) as buf:
                try:
                    got = os.preadv(self._fd, [buf], offset)
                except OSError as exc:
                    raise IoError(
                        path=self._path, op="read", length=length, offset=offset,
                        detail=exc.strerror or str(exc),
                    ) from exc
                if got != length:
                    raise IoError(
                        path=self._path, op="read", length=length, offset=offset,
                        detail=f"short read ({got} bytes): past the end of the device?",
                    )
                return bytes(buf)
        finally:
            self._leave()

    def write(self, offset: int, data: bytes) -> None:
        check_aligned(offset, len(data))
        if not self.writable:
            raise IoError(
                path=self._path, op="write", length=len(data), offset=offset,
                detail="device was opened read-only",
            )
        self._enter("write", offset, len(data))
        try:
            with mmap.mmap(-1, len(data)) as buf:
                buf[:] = data
                try:
                    done = os.pwritev(self._fd, [buf], offset)
                except OSError as exc:
                    raise IoError(
                        path=self._path, op="write", length=len(data), offset=offset,
                        detail=exc.strerror or str(exc),
                    ) from exc
                if done != len(data):
                    raise IoError(
                        path=self._path, op="write", length=len(data), offset=offset,
                        detail=f"short write ({done} bytes)",
                    )
        finally:
            self._leave()

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._inflight == 0:
                os.close(self._fd)


def open_device(path: str, writable: bool = False) -> BlockDevice:
    """The default opener handed to domain code."""
    return DirectDevice(path, writable)


class TimedIO:
    """A ``BlockDevice`` whose every request has a deadline.

    The request runs in a worker thread (an idle one is reused: a thread per
    request cost more than the I/O); if it has not finished after ``timeout``
    seconds the caller gets ``IoTimeout`` and the worker is left behind (it
    cannot be cancelled). ``abandoned`` counts such requests still stuck; past
    ``max_abandoned`` new requests are refused outright, so a dead path cannot
    pile up threads without bound.
    """

    def __init__(self, device: BlockDevice, timeout: float, max_abandoned: int = 32,
                 thread_init: Callable[[], object] | None = None) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.device = device
        self.timeout = timeout
        self.max_abandoned = max_abandoned
        self._lock = threading.Lock()
        self._abandoned = 0
        self._idle: list[_Worker] = []
        self._closed = False
        self.thread_init = thread_init  # run first in each worker (the agent's priority)

    @property
    def path(self) -> str:
        return self.device.path

    @property
    def abandoned(self) -> int:
        with self._lock:
            return self._abandoned

    def _run(self, op: str, offset: int, length: int, fn: Callable[[], T]) -> T:
        check_aligned(offset, length)
        if self.abandoned >= self.max_abandoned:
            raise IoError(
                path=self.path, op=op, length=length, offset=offset,
                detail=f"{self.max_abandoned} earlier requests are still hung; refusing more",
            )
        call: _Call[T] = _Call(fn)
        done = call.done
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(self)
        worker.calls.put(call)
        if not done.wait(self.timeout):
            with self._lock:
                if not done.is_set():
                    call.abandoned = True
                    self._abandoned += 1
                    raise IoTimeout(
                        path=self.path, op=op, length=length, offset=offset,
                        timeout=self.timeout,
                    )
        if call.error is not None:
            raise call.error
        return call.result

    def _forget(self) -> None:
        """Called (under ``_lock``) when an abandoned request finally returns."""
        self._abandoned -= 1

    def read(self, offset: int, length: int) -> bytes:
        return self._run("read", offset, length, lambda: self.device.read(offset, length))

    def write(self, offset: int, data: bytes) -> None:
        data = bytes(data)
        self._run("write", offset, len(data), lambda: self.device.write(offset, data))

    def close(self) -> None:
        with self._lock:
            self._closed = True  # a busy worker exits when done instead of idling forever
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.calls.put(None)
        self.device.close()


class _Call(Generic[T]):
    """One request run by a worker thread; the caller reads it only once ``done`` is set."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.abandoned = False
        self.error: BaseException | None = None
        self.result: T

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc


class _Worker:
    """A thread that runs one TimedIO's requests, one at a time, while it is needed."""

    MAX_IDLE = 2

    def __init__(self, owner: TimedIO) -> None:
        self.owner = owner
        self.calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        threading.Thread(target=self.loop, name="fenceless-io", daemon=True).start()

    def loop(self) -> None:
        owner = self.owner
        if owner.thread_init is not None:
            owner.thread_init()
        while (call := self.calls.get()) is not None:
            call.run()
            with owner._lock:
                # Idle again before the caller wakes: its next request finds this worker.
                keep = not owner._closed and len(owner._idle) < self.MAX_IDLE
                if keep:
                    owner._idle.append(self)
                call.done.set()
                if call.abandoned:
                    owner._forget()
            if not keep:
                return


class MemDevice:
    """An in-memory ``BlockDevice`` for tests, with the same alignment rules.

    Fault hooks:
    - ``tear_next_write(sectors)``: the next write stores only its first
      ``sectors`` sectors and then raises ``IoError`` (a crash mid-write);
    - ``hang()`` / ``unhang()``: requests block until released (a hung path);
    - ``fail_io``: every request raises ``IoError``;
    - ``on_write``: called with (offset, data) before each write is applied.
    """

    def __init__(self, size: int, path: str = "<mem>") -> None:
        check_aligned(0, size)
        self._path = path
        # Anonymous memory is zero until written, so a device of the full control
        # area's size (more than 100 MiB) costs only the pages a test touches.
        self.data = mmap.mmap(-1, size)
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._released.set()
        self._tear: int | None = None
        self.fail_io = False
        self.on_write: Callable[[int, bytes], None] | None = None
        self.writes = 0
        self.reads = 0

    @property
    def path(self) -> str:
        return self._path

    def tear_next_write(self, sectors: int) -> None:
        self._tear = sectors

    def hang(self) -> None:
        self._released.clear()

    def unhang(self) -> None:
        self._released.set()

    def _check(self, op: str, offset: int, length: int) -> None:
        check_aligned(offset, length)
        self._released.wait()
        if self.fail_io:
            raise IoError(path=self._path, op=op, length=length, offset=offset,
                          detail="injected failure")
        if offset + length > len(self.data):
            raise IoError(path=self._path, op=op, length=length, offset=offset,
                          detail="past the end of the device")

    def read(self, offset: int, length: int) -> bytes:
        self._check("read", offset, length)
        with self._lock:
            self.reads += 1
            return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self._check("write", offset, len(data))
        if self.on_write is not None:
            self.on_write(offset, bytes(data))
        with self._lock:
            self.writes += 1
            tear, self._tear = self._tear, None
            if tear is not None:
                part = data[: tear * SECTOR]
                self.data[offset : offset + len(part)] = part
                raise IoError(path=self._path, op="write", length=len(data), offset=offset,
                              detail=f"injected torn write after {tear} sectors")
            self.data[offset : offset + len(data)] = data

    def close(self) -> None:
        pass


def device_size(path: str) -> int:
    """Size in bytes of a block device (from sysfs, nothing opened) or of a regular file."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        name = os.path.basename(os.path.realpath(path))
        with open(f"/sys/class/block/{name}/size") as f:
            return int(f.read().strip()) * 512
    return st.st_size
