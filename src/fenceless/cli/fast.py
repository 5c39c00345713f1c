"""``fenceless status`` at the interpreter's floor: no argparse, no codecs, one socket call.

``status`` runs from scripts and monitoring, so it should cost less than the
``lvs`` an admin would type instead (issue 10). Its common forms (``status``,
``--json``, ``--vg VG``, ``-c PATH``, ``--debug``) are parsed here by hand; the
running agent reads the control area fresh (``ops/status.py``, the same
function a local read uses) and sends the result over its socket. Anything
else (``--help``, a typo) goes to the full parser, and without an agent (or
with one from before this request existed) the status is read from the disk
here, as before. The output is the same either way.

``from_agent`` goes one step further and imports nothing but ``_socket``: it
finds the agent's socket from the config's ``state_dir`` line, and the agent
sends the output ready to print. That skips loading the config (TOML, regexes,
checks), so it is only used when the config file is the very one the agent
checked when it started (same inode, size and modification time, compared by
the agent). Anything it is not sure of (a config it cannot read this simply,
another file, an old agent, any error) goes the way above, which explains it.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

DEFAULT_CONFIG = "/etc/fenceless/fenceless.toml"  # config.DEFAULT_PATH, config.ENV_VAR
CONFIG_ENV = "FENCELESS_CONFIG"
DEFAULT_STATE_DIR = "/var/lib/fenceless"

SHORT_WAIT = 5.0  # seconds for the agent's answer (it reads the control area: ~2 ms)


def parse(argv: Sequence[str]) -> dict[str, Any] | None:
    """The options of a plain ``status`` command line, or None for the full parser."""
    opts: dict[str, Any] = {"json": False, "vg": None, "config": None, "debug": False}
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


def _plain(text: str) -> bool:
    """Whether ``text`` goes into JSON and a path as it is (no escaping needed)."""
    return bool(text) and all(c.isalnum() or c in "/_.+-:" for c in text) and text.isascii()


def state_dir_of(data: bytes) -> str | None:
    """``state_dir`` from a config's text, if it is written plainly (else None: let the
    TOML parser read it). Its default when the top level does not set it."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    found = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            break  # the tables (the VGs) follow the top-level keys
        key, eq, value = line.partition("=")
        if not eq or key.strip() != "state_dir":
            if "state_dir" in line:
                return None  # written some other way: not ours to read
            continue
        value = value.strip().partition("#")[0]
        value = value.strip()
        if found is not None or len(value) < 2 or value[0] != '"' or value[-1] != '"' \
                or not _plain(value[1:-1]) or not value[1:-1].startswith("/"):
            return None
        found = value[1:-1]
    return found or DEFAULT_STATE_DIR


def config_key(st: os.stat_result) -> list[int]:
    """What identifies one version of the config file (the agent compares it)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def from_agent(argv: Sequence[str]) -> int | None:
    """A plain ``status`` answered by the agent with ``_socket`` alone (its exit code), or
    None: then ``status`` (below) or the full parser runs."""
    opts = parse(argv)
    if opts is None or opts["debug"]:
        return None
    vg = opts["vg"]
    found = _agent_socket(opts["config"])
    if found is None or (vg is not None and not _plain(vg)):
        return None
    sock_path, key_json = found
    render = "json" if opts["json"] else "text"
    vg_json = "null" if vg is None else f'"{vg}"'
    request = f'{{"op": "status", "render": "{render}", "vg": {vg_json}, "config_key": {key_json}}}'

    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(SHORT_WAIT)
        sock.connect(sock_path)
        reply = _exchange(sock, request)  # a status changes nothing: any failure falls back
    except OSError:
        return None
    finally:
        sock.close()
    got = None if reply is None else unframe(reply)
    if got is None or got[0] != "T":
        return None  # an error, a reply cut short, or an agent from before this: the
        # way that explains it
    sys.stdout.write(got[2])
    sys.stdout.flush()
    return got[1]


def status(argv: Sequence[str]) -> int | None:
    """Run ``status`` if ``argv`` is a plain one (its exit code), else None."""
    opts = parse(argv)
    if opts is None:
        return None
    import json

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


# --- volume changes ------------------------------------------------------------------------

VOLUME_FORMS = {"create": ("name", "size"), "extend": ("name", "size"),
                "rename": ("name", "new_name"), "remove": ("name",)}


def parse_volume(argv: Sequence[str]) -> dict[str, Any] | None:
    """The options of a plain ``volume create|extend|rename|remove`` line, or None."""
    opts: dict[str, Any] = {"json": False, "vg": None, "config": None, "shared_ro": False,
                            "request_id": None, "timeout": 120.0}
    words: list[str] = []
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--json":
            opts["json"] = True
        elif arg == "--shared-ro":
            opts["shared_ro"] = True
        elif arg in ("-c", "--config", "--vg", "--request-id", "--timeout") and rest \
                and not rest[0].startswith("-"):
            key = {"-c": "config", "--config": "config"}.get(arg, arg[2:].replace("-", "_"))
            opts[key] = rest.pop(0)
        elif arg.startswith("-"):
            return None  # --help, --debug, --x=y, a typo: the full parser
        else:
            words.append(arg)
    if len(words) < 2 or words[0] != "volume" or words[1] not in VOLUME_FORMS:
        return None
    sub, args = words[1], words[2:]
    if len(args) != len(VOLUME_FORMS[sub]) or (opts["shared_ro"] and sub != "create"):
        return None
    try:
        opts["timeout"] = float(opts["timeout"])
    except ValueError:
        return None
    if not 0 < opts["timeout"] < 1e6:
        return None
    opts.update(sub=sub, **dict(zip(VOLUME_FORMS[sub], args, strict=True)))
    return opts


def _user() -> str:
    """The login name, as ``getpass.getuser`` finds it (without importing it)."""
    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        if os.environ.get(var):
            return os.environ[var]
    import pwd

    return pwd.getpwuid(os.getuid())[0]


def _json_str(value: str | None) -> str | None:
    """``value`` as a JSON string when it needs no escaping (else None)."""
    if value is None:
        return "null"
    return f'"{value}"' if _plain(value) else None


def volume_from_agent(argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """A plain volume change sent to the agent with ``_socket`` alone; the agent checks it
    as the full CLI would (``ops/requests.py``) and sends the output, or the error, ready
    to print. Its exit code, or None and the command line for the full CLI: once the
    request may have reached the agent, that line carries its id (``--request-id``), so
    that the writer never carries it out twice."""
    opts = parse_volume(argv)
    if opts is None:
        return None, list(argv)
    found = _agent_socket(opts["config"])
    if found is None:
        return None, list(argv)
    sock_path, key = found
    rid = opts["request_id"] or os.urandom(8).hex()  # as ops/requests.new_request_id
    fields = {"sub": opts["sub"], "name": opts["name"], "size": opts.get("size"),
              "new_name": opts.get("new_name"), "rid": rid, "user": _user(),
              "vg": opts["vg"]}
    encoded = {k: _json_str(v) for k, v in fields.items()}
    if any(v is None for v in encoded.values()):
        return None, list(argv)
    body = ", ".join(f'"{k}": {v}' for k, v in encoded.items())
    request = (f'{{"op": "volume-cli", "render": "{"json" if opts["json"] else "text"}", '
               f'"config_key": {key}, "timeout": {opts["timeout"]!r}, '
               f'"shared_ro": {"true" if opts["shared_ro"] else "false"}, {body}}}')
    retry = list(argv) if opts["request_id"] else [*argv, "--request-id", rid]
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(opts["timeout"] + 5.0)
        try:
            sock.connect(sock_path)
        except OSError:
            return None, list(argv)  # nothing sent: the full CLI says why
        reply = _exchange(sock, request)
    finally:
        sock.close()
    rc = None if reply is None else _print(reply)
    return rc, retry


def _exchange(sock: Any, request: str) -> bytes | None:
    """Send the request and read the whole reply; None if that failed part-way."""
    import _socket

    chunks = []
    try:
        sock.sendall(request.encode())
        sock.shutdown(_socket.SHUT_WR)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks)


def _agent_socket(config: str | None) -> tuple[str, str] | None:
    """The agent's socket from the config's plain ``state_dir`` line, and the config
    file's key as JSON text; None when that cannot be read simply."""
    path = config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            key = config_key(os.fstat(f.fileno()))
            state_dir = state_dir_of(f.read(65536))
    except OSError:
        return None
    if state_dir is None:
        return None
    return os.path.join(state_dir, "agent.sock"), "[" + ", ".join(map(str, key)) + "]"


def unframe(reply: bytes) -> tuple[str, int, str] | None:
    """(kind, code, body) of an agent-rendered reply ``<kind><code> <length>\n<body>``
    (``agent/ipc.py``, ``raw_reply``); None for anything else: a reply cut short (its
    body shorter than its length), an agent from before these, or its JSON error."""
    head, _, body = reply.partition(b"\n")
    kind, code, length = head[:1], *head[1:].partition(b" ")[::2]
    if kind not in (b"T", b"E") or not code.isdigit() or not length.isdigit() or \
            len(body) != int(length):
        return None
    return kind.decode(), int(code), body.decode("utf-8", "replace")


def _print(reply: bytes) -> int | None:
    """Print an agent-rendered reply (its exit code), or None (see ``unframe``)."""
    got = unframe(reply)
    if got is None:
        return None
    kind, code, text = got
    if kind == "T":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        sys.stderr.write(f"fenceless: {text}\n")
    return code
