"""VM definitions as admins write them: libvirt domain XML, and Xen xl configs.

Pure parsing, no hypervisor: what fenceless needs from a definition is its
name, size (memory, vCPUs) and its disks, each of which must be a volume of
the shared VG, read-write (exclusive) or read-only (shareable). The stored
definition stays the admin's XML; at start the host's driver rewrites each
disk's source to the path where that host has the LV.

A definition comes from an admin's file or, on other hosts, from the LUN: it
is untrusted. It is bounded in size and refused if it has any DTD
declaration before it is parsed (no entity can be expanded), and every name
in it is checked like a name typed on the command line.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from fenceless.errors import UserError
from fenceless.validate import lv_name

MAX_XML = 64 * 1024  # bytes of domain XML a definition may have (docs/design.md, "VMs")
VM_NAME_MAX = 64
_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
MODES = ("rw", "ro")
_MEMORY_UNITS = {"b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000,
                 "m": 1 << 20, "mib": 1 << 20, "mb": 1000 ** 2, "g": 1 << 30, "gib": 1 << 30,
                 "gb": 1000 ** 3, "t": 1 << 40, "tib": 1 << 40, "tb": 1000 ** 4}


class BadDefinition(UserError):
    """Refused: the VM definition {source} is not usable: {detail}; nothing was changed"""


class BadVmName(UserError):
    """Refused: {name!r} is not a VM name: use 1 to 64 letters, digits and _ . + - \
(starting with a letter or digit); nothing was changed"""


@dataclass(frozen=True)
class Disk:
    """One disk of a VM: the guest's target device, the volume, and the mode."""

    target: str
    volume: str
    mode: str  # "rw" (exclusive) or "ro" (may be shared by many VMs on many hosts)

    def to_json(self) -> list[str]:
        return [self.target, self.volume, self.mode]


@dataclass(frozen=True)
class DomainSpec:
    """What fenceless reads from a definition; the XML itself is kept as written."""

    name: str
    memory_mib: int
    vcpus: int
    disks: tuple[Disk, ...]
    xml: str


def vm_name(name: str) -> str:
    if not _VM_NAME.match(name):
        raise BadVmName(name=name[:80])
    return name


def volume_of(path: str, vg: str) -> str | None:
    """The LV name a device path names in VG ``vg`` (/dev/VG/LV or /dev/mapper/VG-LV),
    or None when it is not a path into that VG."""
    prefix = f"/dev/{vg}/"
    if path.startswith(prefix) and "/" not in path[len(prefix):]:
        return path[len(prefix):]
    mapper = "/dev/mapper/" + vg.replace("-", "--") + "-"
    if path.startswith(mapper):
        rest = path[len(mapper):]
        # device-mapper doubles each dash inside a name; a single dash would start a layer
        if re.fullmatch(r"(?:[^-]|--)+", rest):
            return rest.replace("--", "-")
    return None


def _memory_mib(amount: str, unit: str, source: str) -> int:
    factor = _MEMORY_UNITS.get(unit.lower() or "kib")
    if factor is None or not amount.isdigit() or len(amount) > 18:
        raise BadDefinition(source=source, detail=f"memory {amount!r} {unit!r} is not a size")
    mib = int(amount) * factor // (1 << 20)
    if mib < 1:
        raise BadDefinition(source=source, detail="memory is below 1 MiB")
    return mib


def _disk_volume(path: str, vg: str, target: str, source: str) -> str:
    volume = volume_of(path, vg)
    if volume is None:
        raise BadDefinition(source=source, detail=(
            f"disk {target}'s source {path!r} is not a volume of VG {vg} (/dev/{vg}/NAME); "
            "every disk of a fenceless VM is a volume of the shared VG"))
    try:
        return lv_name(volume)
    except UserError as exc:
        raise BadDefinition(source=source, detail=f"disk {target}: {exc}") from exc


def _unique(disks: list[Disk], source: str) -> tuple[Disk, ...]:
    seen: dict[str, str] = {}
    for d in disks:
        if d.target in seen.values():
            raise BadDefinition(source=source, detail=f"two disks use target {d.target}")
        if d.volume in seen:
            raise BadDefinition(source=source,
                                detail=f"volume {d.volume} is attached twice")
        seen[d.volume] = d.target
    return tuple(disks)


_FORBIDDEN = ("hostdev", "backingStore", "commandline")  # the last: qemu:commandline


def _no_side_doors(root: ET.Element, vg: str, source: str) -> None:
    """A disk of the VG may only come in as a <disk> (its claim and grant are checked):
    no host device, no backing chain, no raw QEMU arguments, and no device path of the VG
    anywhere else in the XML."""
    allowed = {id(src) for src in root.findall("./devices/disk/source")}
    marks = (f"/dev/{vg}/", "/dev/mapper/" + vg.replace("-", "--") + "-", "/dev/dm-")
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag in _FORBIDDEN:
            raise BadDefinition(source=source, detail=f"<{tag}> is not allowed: a fenceless "
                                "VM's storage is its <disk> elements")
        if id(el) in allowed:
            continue
        for text in (*el.attrib.values(), el.text or ""):
            if any(m in text for m in marks):
                raise BadDefinition(source=source, detail=f"<{tag}> names {text.strip()[:60]!r}"
                                    "; a volume of the VG may only be a <disk>'s source")


def parse_domain_xml(text: str, vg: str, *, source: str = "XML") -> DomainSpec:
    """Name, memory, vCPUs and disks of a libvirt domain XML; refusals say what is wrong."""
    if len(text.encode("utf-8")) > MAX_XML:
        raise BadDefinition(source=source, detail=f"it is larger than {MAX_XML // 1024} KiB")
    declaration = re.search(r"<!(?!--|\[CDATA\[)", text)
    if declaration is not None:
        # A DTD is where entity bombs and external entities live; libvirt never needs one.
        raise BadDefinition(source=source, detail="it has a <!DOCTYPE> or <!ENTITY> "
                            "declaration; libvirt domain XML has none")
    try:
        root = ET.fromstring(text)  # noqa: S314 (no DTD reaches the parser: see above)
    except ET.ParseError as exc:
        raise BadDefinition(source=source, detail=f"malformed XML ({exc})") from exc
    if root.tag != "domain":
        raise BadDefinition(source=source,
                            detail=f"the top element is <{root.tag[:40]}>, not <domain>")
    name_el = root.find("name")
    if name_el is None or not (name_el.text or "").strip():
        raise BadDefinition(source=source, detail="it has no <name>")
    name = vm_name((name_el.text or "").strip())
    mem = root.find("memory")
    if mem is None or not (mem.text or "").strip():
        raise BadDefinition(source=source, detail="it has no <memory>")
    memory = _memory_mib((mem.text or "").strip(), mem.get("unit", "KiB"), source)
    vcpu_el = root.find("vcpu")
    vcpu_text = (vcpu_el.text or "").strip() if vcpu_el is not None else "1"
    if not vcpu_text.isdigit() or not 1 <= int(vcpu_text) <= 4096:
        raise BadDefinition(source=source, detail=f"vcpu {vcpu_text[:20]!r} is not a count")
    _no_side_doors(root, vg, source)
    disks: list[Disk] = []
    for el in root.findall("./devices/disk"):
        device = el.get("device", "disk")
        target_el = el.find("target")
        target = target_el.get("dev", "") if target_el is not None else ""
        if not target:
            raise BadDefinition(source=source, detail="a disk has no <target dev=...>")
        src = el.find("source")
        path = None
        if src is not None:
            path = src.get("dev") or src.get("file")
        if path is None:
            if device == "cdrom":  # an empty drive: nothing to lease
                continue
            raise BadDefinition(source=source, detail=f"disk {target} has no source")
        if el.get("type", "file") != "block":
            raise BadDefinition(source=source, detail=(
                f"disk {target} is of type {el.get('type', 'file')!r}; fenceless VM disks "
                f"are block devices (<disk type='block'>) on VG {vg}"))
        ro = el.find("readonly") is not None or device == "cdrom"
        disks.append(Disk(target, _disk_volume(path, vg, target, source), "ro" if ro else "rw"))
    return DomainSpec(name, memory, int(vcpu_text), _unique(disks, source), text)


# --- Xen xl configs ----------------------------------------------------------------

_XL_TOKEN = re.compile(r"""
    (?P<space>[ \t\r]+) | (?P<comment>\#[^\n]*) | (?P<newline>[\n;]) |
    (?P<ident>[A-Za-z_][A-Za-z0-9_]*) | (?P<number>[0-9]+) |
    (?P<string>"[^"\n]*"|'[^'\n]*') | (?P<punct>[=\[\],]) | (?P<other>.)
""", re.VERBOSE)


def _xl_values(text: str, source: str) -> dict[str, object]:
    """The settings of an xl config: ``KEY = VALUE`` per line (or ``;``), where a value
    is a quoted string, an integer, or a list of strings (which may span lines), and
    ``#`` starts a comment. Anything else is refused, never guessed at."""
    tokens: list[tuple[str, str, int]] = []
    line = 1
    for m in _XL_TOKEN.finditer(text):
        kind = m.lastgroup or "other"
        if kind == "other":
            raise BadDefinition(source=source, detail=f"line {line}: unexpected "
                                f"{m.group()!r} (a value is a quoted string, an integer "
                                "or a [list] of quoted strings)")
        if kind not in ("space", "comment"):
            tokens.append((kind, m.group(), line))
        if kind == "newline" and m.group() == "\n":
            line += 1
    values: dict[str, object] = {}
    i = 0

    def bad(at: int, what: str) -> BadDefinition:
        where = tokens[at][2] if at < len(tokens) else line
        return BadDefinition(source=source, detail=f"line {where}: {what}")

    while i < len(tokens):
        kind, tok, _ = tokens[i]
        if kind == "newline":
            i += 1
            continue
        if kind != "ident" or i + 1 >= len(tokens) or tokens[i + 1][1] != "=":
            raise bad(i, "expected KEY = VALUE")
        key, i = tok, i + 2
        if i >= len(tokens):
            raise bad(i, f"{key} has no value")
        kind, tok, _ = tokens[i]
        if kind == "string":
            values[key], i = tok[1:-1], i + 1
        elif kind == "number":
            values[key], i = int(tok), i + 1
        elif tok == "[":
            items: list[str] = []
            i += 1
            while True:
                while i < len(tokens) and tokens[i][0] == "newline" and tokens[i][1] == "\n":
                    i += 1
                if i >= len(tokens):
                    raise bad(i, f"the list of {key} is not closed")
                kind, tok, _ = tokens[i]
                if tok == "]":
                    i += 1
                    break
                if kind != "string":
                    raise bad(i, f"the items of {key} must be quoted strings")
                items.append(tok[1:-1])
                i += 1
                while i < len(tokens) and tokens[i][0] == "newline" and tokens[i][1] == "\n":
                    i += 1
                if i < len(tokens) and tokens[i][1] == ",":
                    i += 1
            values[key] = items
        else:
            raise bad(i, f"the value of {key} is not a quoted string, an integer or a list")
        if i < len(tokens) and tokens[i][0] != "newline":
            raise bad(i, f"unexpected {tokens[i][1]!r} after the value of {key}")
    return values


def _xl_disk(spec: str, vg: str, source: str) -> Disk:
    """One xl disk spec: positional ``[phy:]PATH,VDEV[:cdrom],MODE`` or key=value form."""
    parts = [p.strip() for p in spec.split(",")]
    keyed = dict(p.split("=", 1) for p in parts if "=" in p)
    positional = [p for p in parts if "=" not in p]
    path = keyed.get("target") or (positional[0] if positional else "")
    vdev = keyed.get("vdev") or (positional[1] if len(positional) > 1 else "")
    access = keyed.get("access") or (positional[2] if len(positional) > 2 else "w")
    for prefix in ("phy:", "file:"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    cdrom = vdev.endswith(":cdrom") or keyed.get("devtype") == "cdrom"
    vdev = vdev.split(":", 1)[0]
    if not vdev or not re.fullmatch(r"[a-z]{2,4}[a-z0-9]{1,4}", vdev):
        raise BadDefinition(source=source, detail=f"disk {spec[:60]!r} has no usable vdev")
    if access not in ("r", "ro", "w", "rw"):
        raise BadDefinition(source=source, detail=f"disk {vdev}: access {access!r} is not "
                            "r, ro, w or rw")
    ro = access in ("r", "ro") or cdrom
    return Disk(vdev, _disk_volume(path, vg, vdev, source), "ro" if ro else "rw")


def parse_xl(text: str, vg: str, *, source: str = "xl config") -> DomainSpec:
    """A Xen xl config (name, memory in MiB, vcpus, disks on the VG) as a domain spec, with
    libvirt XML made from it (``domain_xml``)."""
    if len(text.encode("utf-8")) > MAX_XML:
        raise BadDefinition(source=source, detail=f"it is larger than {MAX_XML // 1024} KiB")
    values = _xl_values(text, source)
    name = values.get("name")
    if not isinstance(name, str):
        raise BadDefinition(source=source, detail="it has no name = \"...\"")
    memory = values.get("memory", 128)
    vcpus = values.get("vcpus", 1)
    if not isinstance(memory, int) or memory < 1:
        raise BadDefinition(source=source, detail="memory must be a whole number of MiB")
    if not isinstance(vcpus, int) or not 1 <= vcpus <= 4096:
        raise BadDefinition(source=source, detail="vcpus must be a count")
    raw_disks = values.get("disk", [])
    if not isinstance(raw_disks, list):
        raise BadDefinition(source=source, detail="disk must be a list of strings")
    disks = _unique([_xl_disk(d, vg, source) for d in raw_disks], source)
    spec = DomainSpec(vm_name(name), memory, vcpus, disks, "")
    return DomainSpec(spec.name, memory, vcpus, disks, domain_xml(spec, vg, kind="xen"))


def domain_xml(spec: DomainSpec, vg: str, *, kind: str = "kvm") -> str:
    """Libvirt XML for a spec (what an xl import stores); paths are /dev/VG/LV."""
    root = ET.Element("domain", type=kind)
    ET.SubElement(root, "name").text = spec.name
    ET.SubElement(root, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(root, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type").text = "xen" if kind == "xen" else "hvm"
    devices = ET.SubElement(root, "devices")
    for d in spec.disks:
        disk = ET.SubElement(devices, "disk", type="block", device="disk")
        driver: dict[str, str] = {"name": "phy"} if kind == "xen" else \
            {"name": "qemu", "type": "raw", "cache": "none"}
        ET.SubElement(disk, "driver", driver)
        ET.SubElement(disk, "source", dev=f"/dev/{vg}/{d.volume}")
        ET.SubElement(disk, "target", dev=d.target)
        if d.mode == "ro":
            ET.SubElement(disk, "readonly")
            ET.SubElement(disk, "shareable")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def with_disk_paths(xml: str, vg: str, paths: dict[str, str]) -> str:
    """The XML with each disk's source set to where this host has its volume mapped
    (``paths``: volume -> device); every disk on the VG must have a path."""
    root = ET.fromstring(xml)  # noqa: S314 (stored XML, checked by parse_domain_xml)
    for el in root.findall("./devices/disk"):
        src = el.find("source")
        if src is None:
            continue
        path = src.get("dev") or src.get("file") or ""
        volume = volume_of(path, vg)
        if volume is None:
            continue
        if volume not in paths:
            raise BadDefinition(source="at start", detail=f"volume {volume} is not mapped")
        for key in ("file", "dev"):
            src.attrib.pop(key, None)
        src.set("dev", paths[volume])
        el.set("type", "block")
    return ET.tostring(root, encoding="unicode")


def with_target_paths(xml: str, paths: dict[str, str]) -> str:
    """A running domain's XML (from its own libvirt, for a live migration) with the disk of
    each target (``vda``, ...) in ``paths`` at the path given there: where the migration's
    destination mapped it. Every target in ``paths`` must be a disk of the domain."""
    root = ET.fromstring(xml)  # noqa: S314 (from the source's libvirtd, not the LUN)
    found = set()
    for el in root.findall("./devices/disk"):
        target, src = el.find("target"), el.find("source")
        dev = target.get("dev") if target is not None else None
        if dev not in paths or src is None:
            continue
        for key in ("file", "dev"):
            src.attrib.pop(key, None)
        src.set("dev", paths[dev])
        el.set("type", "block")
        found.add(dev)
    missing = sorted(set(paths) - found)
    if missing:
        raise BadDefinition(source="of the running domain",
                            detail=f"it has no disk {', '.join(missing)}")
    return ET.tostring(root, encoding="unicode")
