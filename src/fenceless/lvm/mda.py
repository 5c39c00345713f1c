"""Read the VG metadata text straight from a PV's LVM2 metadata area, without LVM.

Why: the agent wants to notice a metadata change every tick. Running ``vgs``
costs a process, a scan and locks, and LVM may "repair" what it reads (write
it back). Reading the metadata area ourselves is one O_DIRECT 4 KiB read per
poll once the area's location is known, and it can never write anything.

The on-disk format (LVM2 ``format_text``; facts checked against
lib/format_text/layout.h and real PVs made by lvm2 2.03.16):

- **Label**: in one of the first four 512-byte sectors: ``id`` "LABELONE"
  (8), ``sector_xl`` u64 (the sector it is in), ``crc_xl`` u32 (over bytes
  20..512 of that sector), ``offset_xl`` u32 (where the PV header starts in
  the sector, normally 32), ``type`` "LVM2 001" (8).
- **PV header** (at label + ``offset_xl``): ``pv_uuid`` (32), ``device_size``
  u64, then a list of data areas and a list of metadata areas, each
  ``(offset u64, size u64)`` and ended by ``(0, 0)``; then an optional
  extension we do not need.
- **mda_header** (512 bytes at each metadata area's start): ``checksum`` u32
  (over bytes 4..512), ``magic`` " LVM2 x[5A%r0N*>" (16), ``version`` u32 (1),
  ``start`` u64 (the area's absolute offset), ``size`` u64, then ``raw_locn``
  entries ``(offset u64, size u64, checksum u32, flags u32)`` ended by zeroes.
  Entry 0 is the committed metadata; flag 1 means "ignored".
- **Text**: at ``start + offset``, ``size`` bytes including a trailing NUL,
  in a circular buffer that spans ``[start + 512, start + size)``: if
  ``offset + size`` passes the end, the rest continues at ``start + 512``.
  Its checksum is LVM's ``calc_crc``: the IEEE CRC-32 table, initial value
  0xf597a6cf and no final inversion.

Everything read from the PV is untrusted: every offset and size is checked
against the sector, the area and the device before it is used, and anything
malformed is a ``MdaError`` (an ``IntegrityError``) naming the device and the
byte offset. All reads go through a ``BlockDevice`` in whole aligned 4 KiB
sectors (the enclosing aligned range is read and sliced).
"""

from __future__ import annotations

import re
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.errors import FencelessError, IntegrityError, UserError

LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
LABEL_SIZE = 512
LABEL_SCAN_SECTORS = 4
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_VERSION = 1
MDA_HEADER_SIZE = 512
INITIAL_CRC = 0xF597A6CF
RAW_LOCN_IGNORED = 0x1
ID_LEN = 32

_LABEL = struct.Struct("<8sQII8s")  # id, sector, crc, offset of pv header, type
_DISK_LOCN = struct.Struct("<QQ")
_MDA_HEADER = struct.Struct("<I16sIQQ")  # checksum, magic, version, start, size
_RAW_LOCN = struct.Struct("<QQII")  # offset, size, checksum, flags
_MAX_LOCNS = 16  # LVM writes 2 data + 2 metadata areas at most; more is garbage
# No device is larger: a read at or past 2**63 bytes is not an I/O error but an
# OverflowError (the offset does not fit off_t), so nothing from the label may point there.
_DEVICE_LIMIT = 1 << 63
# The largest metadata text read. LVM's default area is 1 MiB and fenceless makes 16 MiB
# (room for ~30k LVs); a header pointing at more is damaged, and reading it would
# allocate as much memory.
MAX_TEXT = 256 << 20
_MAX_SEQNO_DIGITS = 20  # a u64; Python refuses int() of more than 4300 digits anyway
_VG_NAME = re.compile(r"[A-Za-z0-9+_.-]{1,127}")  # LVM's rule (a name is NAME_LEN 128 with NUL)


class MdaError(IntegrityError):
    """LVM metadata on {path} at offset {offset}: {detail}"""


class MdaChecksumMismatch(MdaError):
    """LVM metadata on {path} at offset {offset}: {what} checksum mismatch \
(stored {stored:#010x}, computed {computed:#010x})"""


class NotAPv(MdaError):
    """{path} is not an LVM PV (at offset {offset}): {detail}"""


class NoVgMetadata(UserError):
    """{path} holds no VG metadata ({detail})"""


def calc_crc(data: bytes, crc: int = INITIAL_CRC) -> int:
    """LVM2's ``calc_crc``: the IEEE CRC-32 without zlib's pre/post inversion.

    zlib.crc32 inverts the running value on entry and exit; undoing both
    gives LVM's variant, whose initial value is ``INITIAL_CRC``.
    """
    return zlib.crc32(data, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def read_range(dev: BlockDevice, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) via the enclosing aligned sectors (O_DIRECT rule)."""
    if offset < 0 or length < 0:
        raise ValueError(f"bad range {offset}+{length}")
    if length == 0:
        return b""
    start = offset - offset % SECTOR
    end = -(-(offset + length) // SECTOR) * SECTOR
    buf = dev.read(start, end - start)
    return buf[offset - start : offset - start + length]


@dataclass(frozen=True)
class MdaLocation:
    """Where one metadata area is, from the PV header (valid until the PV is re-created)."""

    path: str
    pv_uuid: str
    pv_size: int  # the PV header's device_size: may be less than the device
    start: int  # absolute byte offset of the mda_header
    size: int  # bytes of the whole area, header included


@dataclass(frozen=True)
class MdaInfo:
    """The committed-metadata pointer of one metadata area.

    ``key`` changes whenever LVM commits new metadata: a poll compares it
    with the previous one after reading just the mda_header.
    """

    location: MdaLocation
    offset: int  # of the text, relative to location.start; 0 = no metadata
    size: int  # of the text in bytes, including its trailing NUL
    checksum: int
    flags: int

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.offset, self.size, self.checksum)

    @property
    def empty(self) -> bool:
        return self.offset == 0 and self.size == 0

    @property
    def ignored(self) -> bool:
        return bool(self.flags & RAW_LOCN_IGNORED)

    @property
    def wraps(self) -> bool:
        return self.offset + self.size > self.location.size


def _pv_uuid(raw: bytes) -> str:
    """LVM prints the 32-character id in groups 6-4-4-4-4-4-6."""
    text = raw.decode("ascii", errors="replace")
    parts, pos = [], 0
    for n in (6, 4, 4, 4, 4, 4, 6):
        parts.append(text[pos : pos + n])
        pos += n
    return "-".join(parts)


def read_label(dev: BlockDevice, *, size: int | None = None) -> list[MdaLocation]:
    """Find the label in the first four 512-byte sectors; return its metadata areas.

    ``size`` is the device size when the caller knows it (a BlockDevice
    cannot tell); without it the PV header's own device size bounds the
    areas, and a read past the real end fails in the device.
    """
    path = dev.path
    head = dev.read(0, SECTOR)
    found: int | None = None
    for sector in range(LABEL_SCAN_SECTORS):
        if head[sector * LABEL_SIZE : sector * LABEL_SIZE + 8] == LABEL_ID:
            found = sector
            break
    if found is None:
        raise NotAPv(path=path, offset=0,
                     detail="no LVM2 label (LABELONE) in the first 4 sectors: not a PV")
    base = found * LABEL_SIZE
    sec = head[base : base + LABEL_SIZE]
    _id, sector_xl, crc_xl, offset_xl, ltype = _LABEL.unpack_from(sec)
    if sector_xl != found:
        raise MdaError(path=path, offset=base,
                       detail=f"label claims sector {sector_xl} but is in sector {found}")
    computed = calc_crc(sec[20:])
    if computed != crc_xl:
        raise MdaChecksumMismatch(path=path, offset=base, what="label", stored=crc_xl,
                                  computed=computed)
    if ltype != LABEL_TYPE:
        raise MdaError(path=path, offset=base, detail=f"label type {ltype!r} is not LVM2 001")
    if not _LABEL.size <= offset_xl <= LABEL_SIZE - ID_LEN - 8 - 2 * _DISK_LOCN.size:
        raise MdaError(path=path, offset=base,
                       detail=f"PV header offset {offset_xl} is outside the label sector")
    pos = offset_xl
    pv_uuid = _pv_uuid(sec[pos : pos + ID_LEN])
    (pv_size,) = struct.unpack_from("<Q", sec, pos + ID_LEN)
    pos += ID_LEN + 8
    if size is not None and pv_size > size:
        raise MdaError(path=path, offset=base + offset_xl + ID_LEN,
                       detail=f"PV header says the PV is {pv_size} bytes, the device is {size}")
    # LVM may leave device_size 0 for a PV in a VG; then only the device bounds the areas
    limit = min([b for b in (pv_size, size) if b] + [_DEVICE_LIMIT])
    lists: list[list[tuple[int, int]]] = []
    for _ in range(2):  # data areas, then metadata areas
        entries: list[tuple[int, int]] = []
        while True:
            if pos + _DISK_LOCN.size > LABEL_SIZE or len(entries) >= _MAX_LOCNS:
                raise MdaError(path=path, offset=base + pos,
                               detail="PV header area list runs past the label sector")
            off, length = _DISK_LOCN.unpack_from(sec, pos)
            pos += _DISK_LOCN.size
            if off == 0:
                break
            entries.append((off, length))
        lists.append(entries)
    mdas = []
    for off, length in lists[1]:
        at = base + pos
        if length < MDA_HEADER_SIZE * 2 or off < LABEL_SIZE * LABEL_SCAN_SECTORS \
                or off + length > limit:
            raise MdaError(path=path, offset=at, detail=f"metadata area {off}+{length} is "
                           f"outside the PV ({limit} bytes) or too small")
        mdas.append(MdaLocation(path=path, pv_uuid=pv_uuid, pv_size=pv_size, start=off,
                                size=length))
    return mdas


def _read_header_at(dev: BlockDevice, loc: MdaLocation) -> MdaInfo:
    path = dev.path
    raw = read_range(dev, loc.start, MDA_HEADER_SIZE)
    stored, magic, version, start, size = _MDA_HEADER.unpack_from(raw)
    if magic != MDA_MAGIC:
        raise MdaError(path=path, offset=loc.start,
                       detail=f"no metadata area header (magic {magic[:16]!r})")
    computed = calc_crc(raw[4:])
    if computed != stored:
        raise MdaChecksumMismatch(path=path, offset=loc.start, what="mda_header",
                                  stored=stored, computed=computed)
    if version != MDA_VERSION:
        raise MdaError(path=path, offset=loc.start,
                       detail=f"metadata area header version {version} is not {MDA_VERSION}")
    if start != loc.start or size != loc.size:
        raise MdaError(path=path, offset=loc.start, detail=f"metadata area header says "
                       f"{start}+{size}, the PV header says {loc.start}+{loc.size}")
    off, length, checksum, flags = _RAW_LOCN.unpack_from(raw, _MDA_HEADER.size)
    info = MdaInfo(location=loc, offset=off, size=length, checksum=checksum, flags=flags)
    if info.empty:
        return info
    capacity = loc.size - MDA_HEADER_SIZE
    wrap = max(0, off + length - loc.size)
    if not MDA_HEADER_SIZE <= off < loc.size or not 0 < length <= capacity \
            or MDA_HEADER_SIZE + wrap > off:
        raise MdaError(path=path, offset=loc.start + _MDA_HEADER.size,
                       detail=f"metadata text location {off}+{length} does not fit the "
                       f"circular buffer of {capacity} bytes")
    if length > MAX_TEXT:
        raise MdaError(path=path, offset=loc.start + _MDA_HEADER.size,
                       detail=f"metadata text of {length} bytes is larger than any VG's "
                       f"(at most {MAX_TEXT} are read)")
    return info


def read_mda_header(dev: BlockDevice, *, location: MdaLocation | None = None,
                    size: int | None = None) -> MdaInfo:
    """The committed-metadata pointer of the PV's metadata area in use.

    With ``location`` (from an earlier ``MdaInfo.location``) this is a single
    aligned read of the mda_header: what a poll does each tick. Without it
    the label is read first, and the first metadata area that is not ignored
    and whose header is valid is used (as LVM does with several copies).
    """
    if location is not None:
        return _read_header_at(dev, location)
    locations = read_label(dev, size=size)
    if not locations:
        raise NoVgMetadata(path=dev.path, detail="the PV has no metadata area")
    errors: list[MdaError] = []
    fallback: MdaInfo | None = None
    for loc in locations:
        try:
            info = _read_header_at(dev, loc)
        except MdaError as exc:
            errors.append(exc)
            continue
        if not info.ignored:
            return info
        fallback = fallback or info
    if errors:
        raise errors[0]
    assert fallback is not None
    return fallback


def _read_text_bytes(dev: BlockDevice, info: MdaInfo) -> bytes:
    loc = info.location
    wrap = max(0, info.offset + info.size - loc.size)
    data = read_range(dev, loc.start + info.offset, info.size - wrap)
    if wrap:
        data += read_range(dev, loc.start + MDA_HEADER_SIZE, wrap)
    return data


def read_metadata_text(dev: BlockDevice, *, location: MdaLocation | None = None,
                       size: int | None = None, retries: int = 3,
                       scan: bool = True) -> tuple[str, int]:
    """The committed VG metadata text and its seqno, checksum-verified.

    LVM writes new text beside the old one and then switches the header, so
    the text a header points at stays intact until the commit after next. A
    checksum mismatch is therefore retried when the header moved in between
    (LVM committed twice while we read) and is an error when it did not.

    ``scan=False`` takes the seqno from the text's first lines when they are
    LVM's (``_head``) instead of scanning the whole text: for the writer's
    look right after its own change, whose reader (``lvm/lvtext.py``) refuses
    anything it does not know line by line. Everything else scans.
    """
    info = read_mda_header(dev, location=location, size=size)
    for attempt in range(retries + 1):
        if info.ignored:
            raise NoVgMetadata(path=dev.path, detail="its metadata area is marked ignored")
        if info.empty:
            raise NoVgMetadata(path=dev.path, detail="the PV is not in a VG")
        raw = _read_text_bytes(dev, info)
        computed = calc_crc(raw)
        if computed == info.checksum:
            text = raw.rstrip(b"\0").decode("utf-8", errors="replace")
            head = None if scan else _head(text)
            return text, head[1] if head else parse_seqno(
                text, path=dev.path, offset=info.location.start + info.offset)
        again = read_mda_header(dev, location=info.location)
        if again.key == info.key or attempt == retries:
            raise MdaChecksumMismatch(path=dev.path, offset=info.location.start + info.offset,
                                      what="metadata text", stored=info.checksum,
                                      computed=computed)
        info = again
    raise AssertionError("unreachable")


Copy = tuple[str, int | None, str, bool]  # path, seqno or None, why not, the copy is bad


def read_copies(vg: str, paths: Sequence[str], open_dev: Callable[[str], BlockDevice],
                size_of: Callable[[str], int]) -> list[Copy]:
    """The seqno of VG ``vg``'s metadata copy on each of ``paths`` (its listed PVs).

    A device with no metadata of a VG (a PV made with no metadata area, or one marked
    ignored, or a device not in the VG yet) holds no copy and is left out. Otherwise:
    None and why, with whether the copy itself is bad (``vgck --updatemetadata`` writes
    it anew) or the device (it does not open, or holds another VG). Copies that disagree
    are a hazard (``fenceless check``): a pass that sees them disagree is read again, so
    a commit between two reads is not taken for one.
    """
    out: list[Copy] = []
    for _attempt in range(3):
        out = [_copy(vg, path, open_dev, size_of) for path in paths]
        if len({c[1] for c in out if c[1] is not None}) <= 1:
            break
    return [c for c in out if c[2] != "-"]


def _copy(vg: str, path: str, open_dev: Callable[[str], BlockDevice],
          size_of: Callable[[str], int]) -> Copy:
    try:
        dev = open_dev(path)
    except (FencelessError, OSError) as exc:
        return path, None, f"it does not open: {exc}", False
    try:
        text, seqno = read_metadata_text(dev, size=size_of(path))
        name = committed_identity(text)[0]
    except (NoVgMetadata, NotAPv):
        return path, None, "-", False
    except MdaError as exc:
        return path, None, str(exc), True
    except (FencelessError, OSError) as exc:
        return path, None, str(exc), False
    finally:
        dev.close()
    if name != vg:
        return path, None, f"it holds the metadata of VG {name}, not {vg}", False
    return path, seqno, "", False


# --- the text ---------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<punct>[{}\[\]=,])
  | (?P<word>[^\s{}\[\]=,"\#]+)
""", re.VERBOSE | re.DOTALL)


@dataclass(frozen=True)
class VgSection:
    """The top-level ``name { ... }`` block of a metadata text."""

    name: str
    seqno: int
    start: int  # index in the text of the name
    end: int  # index just past the closing brace


# What the scan must stop at. Each match first skips (atomically: no backtracking
# into it; possessive quantifiers misbehave on groups in Python 3.11.2) plain text and
# strings free of brackets, "#" and escapes, which cannot change the structure;
# words, numbers, "=" and strings only matter at the top two levels, where the
# text between two matches is tokenized again with _TOKEN.
_SCAN = re.compile(r"""
    (?>(?:[^"\#{}\[\]]+|"[^"\\\#{}\[\]]*")*)
    (?:
        (?P<comment>\#[^\n]*)
      | (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<quote>")
      | (?P<punct>[{}\[\]])
      | (?P<end>\Z)
    )
""", re.VERBOSE | re.DOTALL)


def _number(kind: str, tok: str) -> int | None:
    """A seqno's value, written as LVM writes it: ASCII digits, at most a u64's 20.

    ``str.isdigit`` is also true of superscripts (which ``int`` refuses) and of
    other scripts' digits (which it reads), and ``int`` refuses more than 4300
    digits: from a damaged text, each would be a ValueError instead of ours.
    """
    if kind == "word" and tok.isascii() and tok.isdigit() and len(tok) <= _MAX_SEQNO_DIGITS:
        return int(tok)
    return None


def _section(name: str, seqno: int | None, start: int, end: int,
             bad: Callable[[str], MdaError]) -> VgSection:
    """The VG block just closed, if it is one LVM writes: a seqno, and a name by LVM's
    rule (what reads the text next stores the name in a field of 128 bytes)."""
    if seqno is None:
        raise bad(f"VG {name[:127]!r} has no seqno")
    if not _VG_NAME.fullmatch(name):
        raise bad(f"VG name {name[:40]!r} is not one LVM writes (1 to 127 of A-Z a-z 0-9 + _ . -)")
    return VgSection(name=name, seqno=seqno, start=start, end=end)


_SEEN_MAX = 2
_seen: dict[str, VgSection] = {}
_seen_lock = threading.Lock()


def vg_section(text: str, *, path: str = "<text>", offset: int = 0) -> VgSection:
    """The VG block of a metadata text and its top-level ``seqno``, scanned once per text.

    After each change the writer reads the new text from the PV, files it in the
    history (which needs the VG name), and on its next round sees the seqno move
    and reads it again: at a thousand LVs that is 300 KB scanned three times for
    one answer. The last texts scanned are remembered with their section (keyed
    by the whole text, so a changed byte scans again). Errors are not
    remembered: each caller gets one naming its own device and offset.
    """
    with _seen_lock:
        known = _seen.get(text)
    if known is not None:
        return known
    section = _scan_vg_section(text, path=path, offset=offset)
    with _seen_lock:
        _seen[text] = section
        while len(_seen) > _SEEN_MAX:
            del _seen[next(iter(_seen))]
    return section


def _scan_vg_section(text: str, *, path: str, offset: int) -> VgSection:
    """Find the VG block and its top-level ``seqno`` with a small tokenizer.

    Comments and quoted strings are skipped properly, so a description or tag
    that contains "seqno = 9" cannot be mistaken for the seqno. Inside LV and PV
    sections (most of the text) only brackets count: 7 ms at a thousand LVs.
    """
    def bad(detail: str) -> MdaError:
        return MdaError(path=path, offset=offset, detail=f"metadata text: {detail}")

    depth, name, start = 0, "", 0
    word: str | None = None  # the last top-level word: the VG name once "{" follows
    seqno: int | None = None
    run: list[tuple[str, str]] = []  # the last tokens directly inside the VG block

    def token(kind: str, tok: str, at: int) -> VgSection | None:
        nonlocal depth, word, name, start, seqno, run
        if depth == 0:
            if kind == "punct" and tok == "{" and word is not None:
                depth, name, run = 1, word, []
            elif kind == "word":
                word, start = tok, at
            else:
                word = None
            return None
        if kind == "punct" and tok in "{[":
            depth += 1
            run = []
            return None
        if kind == "punct" and tok in "}]":
            depth -= 1
            if depth == 0:
                return _section(name, seqno, start, at + 1, bad)
            return None
        if depth == 1:
            run = [*run[-2:], (kind, tok)]
            if len(run) == 3 and run[0] == ("word", "seqno") and run[1] == ("punct", "="):
                if seqno is not None:
                    raise bad("seqno appears twice")
                seqno = _number(kind, tok)
                if seqno is None:
                    raise bad(f"seqno {tok[:40]!r} is not a number")
        return None

    def gap(lo: int, hi: int) -> VgSection | None:
        if depth > 1:
            return None
        for m in _TOKEN.finditer(text, lo, hi):
            if m.lastgroup not in ("space", "comment"):
                found = token(m.lastgroup or "", m.group(), m.start())
                if found is not None:
                    return found
        return None

    pos = 0
    for m in _SCAN.finditer(text):
        kind = m.lastgroup or ""
        if depth > 1 and kind in ("punct", "string", "comment"):
            if kind == "punct":  # in an LV or PV only brackets matter: no calls (speed)
                depth += 1 if m.group(kind) in "{[" else -1
            pos = m.end()
            continue
        at = m.start(kind)
        found = gap(pos, at)
        if found is not None:
            return found
        pos = m.end()
        if kind == "end":  # matched so that no failed match is retried inside a string
            break
        if kind == "quote":
            raise bad(f"unterminated string at character {at}")
        if kind == "comment":
            continue
        found = token(kind, m.group(kind), at)
        if found is not None:
            return found
    found = gap(pos, len(text))
    if found is not None:
        return found
    raise bad("no complete VG section")


_HEAD_ID = re.compile(r'id = "[A-Za-z0-9-]{1,64}"')


def _head(text: str) -> tuple[str, int] | None:
    """(VG name, seqno) when the text opens exactly as LVM writes it on a PV: ``NAME {``,
    ``id = "..."``, ``seqno = N`` as its first three lines (then the seqno line is the
    VG block's own: nothing precedes the block, and the id line holds no bracket)."""
    lines = text[:400].split("\n", 3)
    if len(lines) < 4 or not lines[0].endswith(" {") or not _HEAD_ID.fullmatch(lines[1]):
        return None
    name, key, digits = lines[0][:-2], lines[2][:8], lines[2][8:]
    seqno = _number("word", digits) if key == "seqno = " else None
    if seqno is None or not _VG_NAME.fullmatch(name):
        return None
    return name, seqno


def vg_identity(text: str) -> tuple[str, int]:
    """(VG name, seqno) of a VG metadata text; ``MdaError`` if it is not one.

    The metadata history on the LUN takes this as its text parser.
    """
    section = vg_section(text)
    return section.name, section.seqno


def committed_identity(text: str) -> tuple[str, int]:
    """``vg_identity`` of a text ``read_metadata_text`` just read from the PV (its checksum
    verified: LVM's own bytes), from its first lines when they are LVM's: the writer
    files every such text in the history ring after each change, and a scan of it all
    would be a tenth of a change's time. A text read back from the LUN is scanned."""
    head = _head(text)
    return head if head is not None else vg_identity(text)


def parse_seqno(text: str, *, path: str = "<text>", offset: int = 0) -> int:
    """The VG's seqno from its metadata text (what ``vgs -o vg_seqno`` shows)."""
    return vg_section(text, path=path, offset=offset).seqno
