"""Errors about what is on the disk: records that do not decode, and stale writers.

They live at the bottom of the package because every reader of the control
area (leases, ledger, mailboxes, rings) raises them, and none of those may
depend on another.
"""

from __future__ import annotations

from fenceless.errors import IntegrityError, LeaseLost, UserError


class CorruptRecord(IntegrityError):
    """Control area region '{region}' at offset {offset}: {detail}; \
refusing to use or overwrite it"""


class BadMagic(CorruptRecord):
    """Control area region '{region}' at offset {offset}: {detail} (magic {magic!r}); \
refusing to use or overwrite it"""


class UnsupportedVersion(CorruptRecord):
    """Control area region '{region}' at offset {offset}: {kind} record has format version \
{version}, this fenceless reads versions {lo}..{hi} ({detail}); refusing to use or overwrite it"""


class BadLength(CorruptRecord):
    """Control area region '{region}' at offset {offset}: length overflow (payload \
{length} bytes, room for {room}); refusing to use or overwrite it"""


class ChecksumMismatch(CorruptRecord):
    """Control area region '{region}' at offset {offset}: checksum mismatch \
(stored {stored:#010x}, computed {computed:#010x}); refusing to use or overwrite it"""




class RecordTooLarge(UserError):
    """A record of {size} bytes does not fit (at most {limit}); nothing was written"""


class StaleEpoch(LeaseLost):
    """Writer epoch {epoch} is stale: {where} carries epoch {seen}; this host is no longer \
the writer and wrote nothing"""
