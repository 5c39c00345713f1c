"""The local agent's control socket: one JSON request, one JSON reply, per connection.

The agent holds this host's leases, so work that needs them (taking over the
writer role, a handover) is asked of the agent rather than done by a second
process that might race it. The socket is a file in the host's state dir,
root-only. Errors travel as a kind (the class name) plus their fields, message
and exit code (``errors.to_wire``), and the client raises them again as the
same class (``errors.from_wire``): a caller tells a refusal from a lost lease
by ``isinstance``, and the CLI explains it exactly as if it had happened
locally.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from fenceless.errors import FencelessError, UserError, from_wire, to_wire

MAX_MESSAGE = 1 << 20


class AgentUnavailable(UserError):
    """No fenceless agent answers on {path} ({reason}). Start it with `fenceless agent` \
(or `systemctl start fenceless-agent`; in the lab, `fenceless lab agent --dir DIR HOST start`)"""


class MessageTooLarge(UserError):
    """A message on the agent's socket {path} is over {limit} bytes ({what}); nothing of it \
was used"""


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, "agent.sock")


def _recv_all(conn: socket.socket, path: str, what: str) -> bytes:
    chunks = []
    total = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > MAX_MESSAGE:
            raise MessageTooLarge(path=path, limit=MAX_MESSAGE, what=what)
    return b"".join(chunks)


def call(state_dir: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the local agent and return its reply (or raise its error)."""
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnavailable(path=path, reason=type(exc).__name__) from exc
        sock.sendall(json.dumps(request).encode())
        sock.shutdown(socket.SHUT_WR)
        try:
            raw = _recv_all(sock, path, "the reply")
        except TimeoutError as exc:
            raise AgentUnavailable(path=path, reason=f"no reply within {timeout:.1f}s") from exc
    finally:
        sock.close()
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise AgentUnavailable(path=path, reason="unreadable reply") from exc
    if not isinstance(reply, dict):
        raise AgentUnavailable(path=path, reason="unreadable reply")
    if "error" in reply:
        # The agent is this host's own, as trusted as this process: its error may name
        # a module of ours to import for the class.
        raise from_wire(reply["error"], load=True)
    result = reply.get("result")
    return result if isinstance(result, dict) else {}


class RawReply(bytes):
    """A reply sent as these bytes, not as JSON: output ready to print (``cli/fast.py``)."""


def raw_reply(kind: str, code: int, body: str) -> RawReply:
    """``<kind><code> <length>\n<body>``: ``T`` (output, and the exit code) or ``E`` (an
    error message). The body's length in bytes lets the client tell a reply cut short
    from a whole one: it then falls back, never prints half."""
    data = body.encode()
    return RawReply(f"{kind}{code} {len(data)}\n".encode() + data)


Handler = Callable[[dict[str, Any]], "dict[str, Any] | RawReply"]


class Server:
    """A tiny threaded Unix-socket server; each request runs ``handler`` in its own thread."""

    def __init__(self, state_dir: str, handler: Handler) -> None:
        self.path = socket_path(state_dir)
        self.handler = handler
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        old = os.umask(0o077)
        try:
            self._sock.bind(self.path)
        finally:
            os.umask(old)
        self._sock.listen(16)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ipc", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5.0)
                request = json.loads(_recv_all(conn, self.path, "a request"))
                if not isinstance(request, dict):
                    raise ValueError("request is not an object")
                conn.settimeout(None)
                result = self.handler(request)
                if isinstance(result, RawReply):
                    with contextlib.suppress(OSError):
                        conn.sendall(result)
                    return
                reply: dict[str, Any] = {"result": result}
            except FencelessError as exc:
                reply = {"error": to_wire(exc)}
            except Exception as exc:
                reply = {"error": {"message": f"agent internal error: {type(exc).__name__}: "
                                   f"{exc}", "code": 1, "kind": "InternalError"}}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode())
