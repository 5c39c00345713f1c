"""Loop devices: the lab's SAN paths and its stand-in for device-mapper.

Facts come from sysfs (read-only, no device opened); changes go through
``losetup``, except resizing a mapping in place, which losetup cannot do:
that uses the LOOP_SET_STATUS64 ioctl on the loop device itself.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from fenceless.runner import Runner

SYS_BLOCK = Path("/sys/block")

LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64: 5 x u64, 4 x u32, 64 + 64 + 32 bytes, 2 x u64.
_LOOP_INFO64 = struct.Struct("<QQQQQIIII64s64s32sQQ")
_SIZELIMIT_INDEX = 4


@dataclass(frozen=True)
class LoopInfo:
    device: str
    backing: str
    offset: int
    sizelimit: int
    readonly: bool


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def list_loops() -> list[LoopInfo]:
    """Every attached loop device, from sysfs."""
    out = []
    for entry in sorted(SYS_BLOCK.glob("loop*")):
        backing = _read(entry / "loop" / "backing_file")
        if not backing:
            continue
        backing = backing.removesuffix(" (deleted)")
        if re.fullmatch(r"/loop[0-9]+", backing):
            # Attached from inside a lab host's mount namespace, the path is shown
            # relative to a /dev that this namespace cannot reach.
            backing = "/dev" + backing
        out.append(LoopInfo(
            device=f"/dev/{entry.name}",
            backing=backing,
            offset=int(_read(entry / "loop" / "offset") or 0),
            sizelimit=int(_read(entry / "loop" / "sizelimit") or 0),
            readonly=_read(entry / "ro") == "1",
        ))
    return out


def info(device: str) -> LoopInfo | None:
    return next((x for x in list_loops() if x.device == device), None)


def attach(
    runner: Runner, backing: str, *, offset: int = 0, sizelimit: int = 0, readonly: bool = False,
    direct_io: bool = False,
) -> str:
    """Attach a loop device; ``direct_io`` makes it keep no cache of its own, like dm-linear."""
    argv = ["losetup", "--find", "--show"]
    if direct_io:
        argv.append("--direct-io=on")
    if offset:
        argv += ["--offset", str(offset)]
    if sizelimit:
        argv += ["--sizelimit", str(sizelimit)]
    if readonly:
        argv.append("--read-only")
    argv.append(backing)
    return runner.run(argv, timeout=30).stdout.strip()


def detach(runner: Runner, device: str) -> None:
    runner.run(["losetup", "--detach", device], timeout=30, check=False)


def tree(roots: set[str]) -> list[LoopInfo]:
    """Loop devices backed by ``roots`` (files) or, transitively, by those loops.

    Returned deepest first, the order in which they must be detached.
    """
    loops = list_loops()
    found: list[tuple[int, LoopInfo]] = []
    frontier = {os.path.realpath(r) for r in roots}
    depth = 0
    seen: set[str] = set()
    while frontier:
        level = [x for x in loops if os.path.realpath(x.backing) in frontier
                 and x.device not in seen]
        found += [(depth, x) for x in level]
        seen.update(x.device for x in level)
        frontier = {x.device for x in level}
        depth += 1
    return [x for _, x in sorted(found, key=lambda t: -t[0])]


def set_sizelimit(device: str, sizelimit: int) -> None:
    """Resize a mapping in place (the lab's refresh after an extend)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(_LOOP_INFO64.size)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
        fields = list(_LOOP_INFO64.unpack(bytes(buf)))
        fields[_SIZELIMIT_INDEX] = sizelimit
        fcntl.ioctl(fd, LOOP_SET_STATUS64, _LOOP_INFO64.pack(*fields))
    finally:
        os.close(fd)
