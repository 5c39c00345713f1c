"""Checks for names and sizes that come from admins (and, later, from the disk).

Pure functions: a refusal here happens before any lock, lease or LVM call.
"""

from __future__ import annotations

import re

from fenceless.errors import InvalidName, InvalidSize

_LV_RE = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
# LVM refuses these inside LV names, for its own hidden sub-LVs.
_LV_RESERVED_PARTS = ("_cdata", "_cmeta", "_corig", "_mlog", "_mimage", "_pmspare", "_rimage",
                      "_rmeta", "_tdata", "_tmeta", "_vorigin", "_vdata", "snapshot", "pvmove")
LV_NAME_MAX = 127


def lv_name(name: str, *, kind: str = "volume") -> str:
    if not name:
        raise InvalidName(kind=kind, name=name, reason="it is empty")
    if len(name) > LV_NAME_MAX:
        raise InvalidName(kind=kind, name=name, reason=f"longer than {LV_NAME_MAX} characters")
    if name in (".", ".."):
        raise InvalidName(kind=kind, name=name, reason="'.' and '..' are not names")
    if not _LV_RE.match(name):
        raise InvalidName(kind=kind, name=name,
                          reason="use letters, digits and + _ . - (not starting with -)")
    for part in _LV_RESERVED_PARTS:
        if part in name:
            raise InvalidName(kind=kind, name=name,
                              reason=f"LVM reserves names containing {part!r}")
    return name


_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def request_id(rid: str) -> str:
    """A request id: it becomes part of an LVM tag and of records on the LUN."""
    if not _REQUEST_ID_RE.match(rid):
        raise InvalidName(kind="request id", name=rid,
                          reason="use 1 to 64 letters, digits and _ . -")
    return rid


_UNITS = {"": None, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_SIZE_DIGITS = 40  # a size's number, fraction included: 8 EiB (LVM's largest LV) has 19


def parse_size(text: str, *, minimum: int = 1) -> int:
    """Bytes from ``512M``, ``10G``, ``1.5T`` (binary units, as LVM's -L reads them)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidSize(text=text, reason="expected a number and a unit, like 512M or 10G")
    number, unit = m.group(1), m.group(2).lower()
    if len(number) > _SIZE_DIGITS:
        # int() refuses more than 4300 digits with a ValueError, and no LV needs 20.
        raise InvalidSize(text=text, reason=f"more than {_SIZE_DIGITS} digits")
    if unit.endswith("ib"):
        unit = unit[:-2]
    elif unit.endswith("b") and len(unit) == 2:
        unit = unit[:-1]
    if unit not in _UNITS:
        raise InvalidSize(text=text, reason=f"unknown unit {m.group(2)!r} (use B, K, M, G, T or P)")
    factor: int | None = _UNITS[unit]
    if factor is None:
        raise InvalidSize(text=text, reason="a unit is required, like 512M or 10G "
                          "(a bare number is ambiguous: LVM reads it as MiB)")
    value: int
    if "." in number:
        whole, frac = number.split(".")
        value = int(whole) * factor + (int(frac) * factor) // (10 ** len(frac))
    else:
        value = int(number) * factor
    if value < minimum:
        raise InvalidSize(text=text, reason="the size must be greater than zero" if minimum == 1
                          else f"the size must be at least {human(minimum)}")
    return value


def human(n: int) -> str:
    """Bytes as a short binary-unit string for messages (exact where it can be)."""
    for unit, factor in (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20),
                         ("K", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f}{unit}" if n % factor == 0 else f"{value:.2f}{unit}"
    return f"{n}B"
