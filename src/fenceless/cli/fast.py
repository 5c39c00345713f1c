"""``fenceless status`` at the interpreter's floor: no argparse, no codecs, one socket call.

``status`` runs from scripts and monitoring, so it should cost less than the
``lvs`` an admin would type instead (issue 10). Its common forms (``status``,
``--json``, ``--vg VG``, ``-c PATH``, ``--debug``) are parsed here by hand; the
running agent reads the control area fresh (``ops/status.py``, the same
function a local read uses) and sends the result over its socket. Anything
else (``--help``, a typo) goes to the full parser, and without an agent (or
with one from before this request existed) the status is read from the disk
here, as before. The output is the same either way.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

SHORT_WAIT = 5.0  # seconds for the agent's answer (it reads the control area: ~2 ms)


def parse(argv: Sequence[str]) -> dict[str, Any] | None:
    """The options of a plain ``status`` command line, or None for the full parser."""
    opts: dict[str, Any] = {"json": False, "vg": None, "config": None}
    rest = list(argv)
    seen_status = False
    while rest:
        arg = rest.pop(0)
        if arg == "status" and not seen_status:
            seen_status = True
        elif arg in ("--json", "--debug"):
            opts[arg[2:]] = True
        elif arg in ("-c", "--config", "--vg") and rest and not rest[0].startswith("-"):
            opts["vg" if arg == "--vg" else "config"] = rest.pop(0)
        elif arg.startswith(("--config=", "--vg=")):
            key, _, value = arg[2:].partition("=")
            if not value:
                return None
            opts[key] = value
        else:
            return None
    return opts if seen_status else None


def status(argv: Sequence[str]) -> int | None:
    """Run ``status`` if ``argv`` is a plain one (its exit code), else None."""
    opts = parse(argv)
    if opts is None:
        return None
    from fenceless import config

    cfg = config.load(config.resolve_path(opts["config"]))
    result = _from_agent(cfg, opts["vg"])
    if result is None:
        from fenceless.ops.status import read_status

        result = read_status(cfg, opts["vg"])
    if opts["json"]:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        from fenceless.cli.render import status_text

        print(status_text(result))
    sys.stdout.flush()
    return 0


def _from_agent(cfg: Any, vg: str | None) -> dict[str, Any] | None:
    """The agent's fresh read of the control area; None when no agent (that knows the
    request) answers."""
    from fenceless.agent import ipc
    from fenceless.errors import FencelessError

    try:
        got = ipc.call(cfg.state_dir, {"op": "status", "vg": vg, "timeout": SHORT_WAIT},
                       timeout=SHORT_WAIT)
    except ipc.AgentUnavailable:
        return None
    except FencelessError as exc:
        if type(exc).__name__ in ("UnknownRequest", "RemoteError"):
            return None  # an agent from before this request: read the disk here
        raise
    return got if isinstance(got, dict) else None
