"""``fenceless watchdog``: the watchdog daemon put together for this host.

The watchdog is its own process (``watchdog/``), not part of the agent: a
frozen agent must not freeze its fence. This module only assembles it from
the host's config: the work cgroup it kills, the hardware device it pets (if
configured and present), and, in a lab, the extra step a reset does there
(the host's LV mappings are loop devices, which a kill does not remove).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any

from fenceless.cgroup import CgroupError, WorkGroup
from fenceless.clock import SystemClock
from fenceless.config import HostConfig
from fenceless.holders import holders, kill_holders, vg_devices
from fenceless.lab.activation import reset_host
from fenceless.runner import SubprocessRunner
from fenceless.watchdog.daemon import Watchdog
from fenceless.watchdog.hardware import HardwareWatchdog

HARDWARE_TIMEOUT_N = 3  # the device resets the host 3N after the last pet (13N < 14N)


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def run_watchdog(cfg: HostConfig) -> int:
    try:
        work: WorkGroup | None = WorkGroup.under_root(cfg.cgroup).create()
    except CgroupError as exc:
        _log(f"WARNING: no work cgroup ({exc}): firing kills the agent only")
        work = None
    device = None
    if cfg.watchdog_device != "none" and os.path.exists(cfg.watchdog_device):
        device = HardwareWatchdog(cfg.watchdog_device,
                                  max(1, math.ceil(HARDWARE_TIMEOUT_N * cfg.io_timeout)))
        _log(f"petting {cfg.watchdog_device} (timeout {device.timeout}s)")
    def kill_vms() -> None:
        """The VMs: QEMU is libvirt's child, not in the work cgroup. Whatever holds a
        mapping of a shared VG open is killed (``holders.py``)."""
        devices = [d for vg in cfg.vgs for d in vg_devices(cfg, vg.name)]
        kill_holders(devices)
        deadline = time.monotonic() + 2.0
        while holders(devices) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = holders(devices)
        if left:
            raise RuntimeError(f"processes {left} still hold {devices} open after SIGKILL")

    reset_extra = kill_vms
    if cfg.activation == "lab":
        def reset_extra() -> None:
            kill_vms()
            reset_host(cfg.state_dir, SubprocessRunner())
    wd = Watchdog(cfg.state_dir, work, SystemClock(), _log, device, reset_extra,
                  run_dir=cfg.run_dir)

    def on_signal(signum: int, _frame: Any) -> None:
        _log(f"signal {signal.Signals(signum).name}: stopping")
        wd.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _log(f"fenceless watchdog on host {cfg.host} (pid {os.getpid()}), work cgroup "
         f"{work.path if work else 'none'}")
    wd.serve()
    if device is not None:
        # Disarm the hardware only when no agent is armed: else let it reset the host.
        device.close(disarm=not any(c.arms for c in wd.watch.clients))
    return 0
