"""The lab's tiny guest: a Debian kernel and a busybox initramfs that counts on its disk.

Built once and cached (``CACHE``): the kernel comes from Debian's
``linux-image-*-amd64-unsigned`` package (``apt-get download``, ``dpkg -x``),
the initramfs is busybox-static, the six virtio modules its disk needs
(``virtio_blk`` is a module in Debian's kernel; the load order below works
without a modules.dep), and ``/init``. Under TCG it boots in a few seconds.

What ``/init`` does, by the kernel command line:

- ``fl_mode=counter`` (the demo and the VM tests): it reads the last record in
  sector 0 of /dev/vda and goes on counting from there, writing each record
  ``FLCOUNT <n> <fl_id>-<boot>`` to sector ``1 + n % RING`` and then to sector 0,
  each write synced; ``<boot>`` is random per boot, so a reader of the disk sees
  which instance wrote each number: two instances writing at once show up as
  interleaved ids, a stop and a start elsewhere as one change of id.
- ``fl_mode=poweroff``: it powers off at once (a boot-time measurement).
"""

from __future__ import annotations

import fcntl
import gzip
import io
import os
import shutil
import stat
from pathlib import Path

from fenceless.errors import LabError
from fenceless.runner import Runner

GUEST_VERSION = 2  # bump when /init or the build changes: the cache is per version
CACHE = Path(f"/var/cache/fenceless-lab/guest/v{GUEST_VERSION}")
KERNEL_PACKAGE = "linux-image-amd64"  # the metapackage names the current kernel
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_blk")
RING = 2047  # counter records kept on the disk (sectors 1..RING)
RECORD = "FLCOUNT"

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/modules/$m.ko; done
arg() {{ sed -n "s/.*$1=\\([^ ]*\\).*/\\1/p" /proc/cmdline; }}
[ "$(arg fl_mode)" = poweroff ] && poweroff -f
id="$(arg fl_id)-$(cut -c1-8 /proc/sys/kernel/random/uuid)"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
n=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 80 | \\
    sed -n 's/^{record} \\([0-9]*\\) .*/\\1/p')
n=${{n:-0}}
echo "fenceless counter: $id continues from $n"
while true; do
  n=$((n + 1))
  rec=$(printf '%-511s' "{record} $n $id")
  echo "$rec" | dd of=/dev/vda bs=512 seek=$((1 + n % {ring})) conv=notrunc,fsync 2>/dev/null
  echo "$rec" | dd of=/dev/vda bs=512 seek=0 conv=notrunc,fsync 2>/dev/null
  usleep 200000
done
"""


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks: (path, mode, data)."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1
    return out.getvalue()


def initramfs(busybox: bytes, modules: dict[str, bytes]) -> bytes:
    """The gzip'd initramfs: busybox, the virtio modules and the counter's /init."""
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries = [(p, d, b"") for p in ("bin", "dev", "proc", "sys", "lib", "lib/modules")]
    entries += [("bin/busybox", x, busybox)]
    entries += [(f"lib/modules/{m}.ko", f, modules[m]) for m in MODULES]
    script = INIT.format(modules=" ".join(MODULES), record=RECORD, ring=RING)
    entries += [("init", x, script.encode())]
    return gzip.compress(_cpio_newc(entries), mtime=0)


def build(runner: Runner, cache: Path = CACHE) -> tuple[Path, Path]:
    """(kernel, initrd), built into ``cache`` on first use.

    Several lab tests (or demos) may ask at once on a fresh machine: the first builds
    while the others wait on the cache's lock, then find it built."""
    kernel, initrd = cache / "vmlinuz", cache / "initrd.gz"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if kernel.exists() and initrd.exists():
            return kernel, initrd
        return _build(runner, cache, kernel, initrd)


def _build(runner: Runner, cache: Path, kernel: Path, initrd: Path) -> tuple[Path, Path]:
    work = cache / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    version = _kernel_version(runner)
    package = f"linux-image-{version}-unsigned"
    _download(runner, package, work)
    debs = sorted(work.glob("*.deb"))
    if not debs:
        raise LabError(dir=str(cache), detail=f"apt-get download {package} gave no package")
    runner.run(["dpkg", "-x", str(debs[0]), str(work / "x")])
    moddir = work / "x" / "lib" / "modules" / version / "kernel" / "drivers"
    modules = {}
    for m in MODULES:
        found = list(moddir.rglob(f"{m}.ko"))
        if not found:
            raise LabError(dir=str(cache), detail=f"{package} has no {m}.ko")
        modules[m] = found[0].read_bytes()
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise LabError(dir=str(cache), detail="busybox-static is not installed "
                       "(scripts/setup installs it)")
    tmp = initrd.with_suffix(".tmp")
    tmp.write_bytes(initramfs(busybox.read_bytes(), modules))
    shutil.copyfile(work / "x" / "boot" / f"vmlinuz-{version}", kernel.with_suffix(".tmp"))
    os.replace(kernel.with_suffix(".tmp"), kernel)
    os.replace(tmp, initrd)
    for p in (kernel, initrd):
        p.chmod(0o644)  # QEMU runs as libvirt's own user
    shutil.rmtree(work, ignore_errors=True)
    return kernel, initrd


def _kernel_version(runner: Runner) -> str:
    """The kernel the metapackage depends on now, as ``6.1.0-57-amd64``."""
    out = runner.run(["apt-cache", "depends", KERNEL_PACKAGE]).stdout
    for line in out.splitlines():
        if not line.strip().startswith("Depends:"):
            continue
        dep = line.strip().removeprefix("Depends:").strip()
        if dep.startswith("linux-image-") and dep.endswith("-amd64"):
            return dep.removeprefix("linux-image-")
    raise LabError(dir=str(CACHE), detail=f"cannot tell the kernel of {KERNEL_PACKAGE}")


def _download(runner: Runner, package: str, work: Path) -> None:
    runner.run(["sh", "-c", 'cd "$1" && apt-get download -q "$2"', "download", str(work),
                package])


def counter_domain(name: str, vg: str, volume: str, kernel: Path, initrd: Path) -> str:
    """Libvirt XML for the counter guest on volume ``volume`` (TCG: no KVM here)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet fl_mode=counter fl_id={name}</cmdline>
  </os>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/{vg}/{volume}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='/var/log/libvirt/qemu/{name}-console.log'/>
    </serial>
  </devices>
</domain>
"""


def read_counter(raw: bytes) -> list[tuple[int, str]]:
    """The counter records in the first ``1 + RING`` sectors of the guest's disk, by
    number: (n, instance). Sector 0 repeats the latest and is left out."""
    out = {}
    for i in range(1, min(len(raw) // 512, RING + 1)):
        parts = raw[i * 512:(i + 1) * 512].split()
        if len(parts) == 3 and parts[0] == RECORD.encode() and parts[1].isdigit():
            out[int(parts[1])] = parts[2].decode(errors="replace")
    return sorted(out.items())
