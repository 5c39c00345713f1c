"""``fenceless check``: audit the cluster for every known hazard (``ops/check.py``).

Parsing and output only. Exit code 0 when no finding is an error, 6 when one is.
"""

from __future__ import annotations

import argparse
from typing import Any

from fenceless.cli.common import command, load_config, vg_option

EXIT_FOUND = 6  # at least one finding of severity "error"


def register(sub: Any, name: str) -> None:
    """Add the ``check`` command to the top-level ``sub``."""
    sp = command(sub, name, "check", "audit the whole cluster for known hazards: each finding "
                 "with a code, its host, what is wrong and the command that fixes it "
                 f"(exit {EXIT_FOUND} if any is an error)")
    vg_option(sp)
    sp.add_argument("--warn", action="append", default=[], metavar="CODE",
                    help="report this error code as a warning (a hazard you accept); "
                    "may be repeated")


def run(args: argparse.Namespace) -> int:
    import json

    from fenceless.blockio import TimedIO, device_size, open_device
    from fenceless.guard import install
    from fenceless.lvm import mda
    from fenceless.lvm.adapter import Lvm
    from fenceless.ops import check
    from fenceless.ops.context import Context
    from fenceless.ops.status import read_status
    from fenceless.ops.vmquery import read_ledger

    cfg = load_config(args)
    ctx = Context(cfg)
    lvm: Lvm = ctx.lvm(args.vg)

    def auto() -> bool | None:
        got = install.autoactivation(cfg, ctx.runner, only=lvm.vg.name)
        return got[0].get("autoactivation") if got else None

    def copies() -> list[mda.Copy]:
        timeout = max(cfg.io_timeout, 1.0)
        return mda.read_copies(lvm.vg.name, lvm.vg.devices,
                               lambda p: TimedIO(open_device(p), timeout), device_size)

    facts = check.gather(cfg, args.vg, read_status, lambda: read_ledger(cfg, args.vg),
                         lvm.vg_and_lvs, auto,
                         lambda: install.status(cfg, ctx.runner, lvm_report=False), copies,
                         lvm.pvs)
    findings = check.run_checks(facts, frozenset(args.warn))
    if getattr(args, "json", False):
        print(json.dumps(check.as_json(findings), indent=2, sort_keys=True))
    else:
        print(text(findings, facts.vg_name))
    return EXIT_FOUND if any(f.severity == "error" for f in findings) else 0


def text(findings: list[Any], vg: str) -> str:
    """One block per finding, errors first, and a last line that counts them."""
    if not findings:
        return f"VG {vg}: no hazard found"
    lines = []
    for f in findings:
        where = f" [{f.host}]" if f.host else ""
        lines += [f"{f.severity.upper():7} {f.code}{where}: {f.message}", f"        fix: {f.fix}"]
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    lines.append(f"VG {vg}: {errors} error(s), {warnings} warning(s), "
                 f"{len(findings) - errors - warnings} note(s)")
    return "\n".join(lines)
