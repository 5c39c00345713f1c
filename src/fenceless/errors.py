"""The one error hierarchy of fenceless.

Each class's docstring is its message template (as in borg): ``str.format``
fields are filled from the keyword arguments given at raise time. The class
tells the admin how much may have changed, through its exit code:

====  =============  =====================================================
code  class          meaning
====  =============  =====================================================
0                    success
1                    internal error (a bug; run again with --debug)
2     UserError      refused or bad input: nothing was changed
3     ExecError      an action failed part-way: something may have changed
4     IntegrityError on-disk data failed a check: nothing was written over it
5     LeaseLost      a lease ran out: exclusive work was stopped
130                  interrupted (Ctrl-C)
====  =============  =====================================================

Every refusal has a class of its own, defined in the module that raises it,
whose template names the variable parts: a caller (or a test) reads
``exc.fields["name"]`` instead of parsing text. The four classes above are
*generic* (their template is just ``{detail}``): they are bases to catch,
never raised themselves (``tests/unit/test_errors.py`` checks).

Errors cross process boundaries (the agent's socket, the writer's replies in
the mailboxes on the LUN) as a kind (the class name, unique in the package)
plus fields: ``to_wire`` and ``from_wire`` below, so the receiver raises the
same class, with the same exit code, as the sender would have.

Only ``cli.main`` prints errors and exits; everything else raises.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

# Every FencelessError subclass of this package, by class name: what ``from_wire``
# looks a kind up in. Classes defined outside the package (a test's) are not
# registered, so none can stand in for one of ours.
_REGISTRY: dict[str, type[FencelessError]] = {}
_MODULE = re.compile(r"fenceless(\.[a-z_][a-z0-9_]*)+")
_MAX_DEPTH = 6  # of nested containers in a field, when it is made JSON-safe


class FencelessError(Exception):
    """{detail}"""

    exit_code: ClassVar[int] = 1
    _sent: str | None = None  # the sender's text, for an error rebuilt by from_wire

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__.split(".")[0] == "fenceless":
            _REGISTRY.setdefault(cls.__name__, cls)

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        super().__init__(self.message)

    @classmethod
    def template(cls) -> str:
        return (cls.__doc__ or "{detail}").strip()

    @classmethod
    def rebuilt(cls, fields: dict[str, Any], message: str | None) -> FencelessError:
        """This class with ``fields``, as another process raised it (``from_wire``).

        ``message`` is the text the sender formatted: when given it is shown
        as it is, because the fields were made JSON-safe on the way (a tuple
        arrives as a list and prints otherwise) and a peer of another version
        may have another template; the fields are there for callers to read.
        """
        exc = cls.__new__(cls)
        exc.fields = fields
        exc._sent = message
        Exception.__init__(exc, exc.message)
        return exc

    @property
    def message(self) -> str:
        if self._sent is not None:
            return self._sent
        template = self.template()
        try:
            return template.format(**self.fields)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError):
            # A template/field mismatch must never hide the original error.
            return f"{template} {self.fields!r}"

    def __str__(self) -> str:
        return self.message


_REGISTRY[FencelessError.__name__] = FencelessError  # (__init_subclass__ sees only subclasses)


class UserError(FencelessError):
    """{detail}"""

    exit_code = 2


class ExecError(FencelessError):
    """{detail}"""

    exit_code = 3


class IntegrityError(FencelessError):
    """{detail}"""

    exit_code = 4


class LeaseLost(FencelessError):
    """{detail}"""

    exit_code = 5


# --- user errors --------------------------------------------------------------


class UsageError(UserError):
    """{detail}"""


class ConfigError(UserError):
    """Config {path}: {detail}"""


class InvalidName(UserError):
    """Invalid {kind} name {name!r}: {reason}"""


class InvalidSize(UserError):
    """Invalid size {text!r}: {reason}"""


class RoleRefused(UserError):
    """Refused: `lvm {command}` changes VG metadata, and this host's LVM role is reader. \
{hint}"""


class LabError(UserError):
    """Lab {dir}: {detail}"""


class NotFound(UserError):
    """{kind} {name!r} not found{where}"""


# --- execution errors -----------------------------------------------------------


class CommandFailed(ExecError):
    """`{argv0}` failed (exit {rc}): {stderr}"""


class CommandTimeout(ExecError):
    """`{argv0}` did not finish within {timeout:.1f}s and was killed"""


class LvmError(ExecError):
    """LVM `{command}` failed (exit {rc}): {stderr}"""


class LvmOutputError(IntegrityError):
    """LVM `{command}` printed a report fenceless cannot read: {detail}"""


# --- an error in another process -------------------------------------------------------


class RemoteError(FencelessError):
    """{message}"""

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return _exit_code(self.fields.get("code"), 1)


def _exit_code(code: Any, default: int) -> int:
    """``code`` if it is an exit code an error may have (1..255), else ``default``."""
    ok = isinstance(code, int) and not isinstance(code, bool) and 1 <= code <= 255
    return int(code) if ok else default


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can carry it: containers as lists and objects, the rest as text.

    What does not survive is the type: a tuple comes back a list, a path a
    string. That is why ``rebuilt`` shows the sender's message as it was sent.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [json_safe(v, depth + 1) for v in value]
        if isinstance(value, (set, frozenset)):
            return sorted((json_safe(v, depth + 1) for v in value), key=repr)
    return str(value)


def to_wire(exc: FencelessError) -> dict[str, Any]:
    """An error as JSON data: its kind (class name), module, fields, message and exit code."""
    return {"kind": type(exc).__name__, "module": type(exc).__module__,
            "fields": {str(k): json_safe(v) for k, v in exc.fields.items()},
            "message": exc.message, "code": exc.exit_code}


def from_wire(data: object, *, load: bool = False, default_code: int = 1) -> FencelessError:
    """The error ``to_wire`` described, as the same class: ``isinstance`` and the exit
    code are right on this side too.

    The kind is looked up among the classes already registered; only with
    ``load`` (the local agent's socket: a peer as trusted as this process) is
    the named ``fenceless.`` module imported first if it is not yet, so that
    a class this process had no reason to import is still found. Data read
    from the disk never names a module to import. An unknown kind becomes a
    ``RemoteError`` with the transmitted message and exit code. Nothing in
    ``data`` is trusted to have the right type.
    """
    if not isinstance(data, Mapping):
        data = {}
    kind, module = data.get("kind"), data.get("module")
    code = _exit_code(data.get("code"), default_code)
    raw = data.get("fields")
    fields = {k: v for k, v in raw.items() if isinstance(k, str)} \
        if isinstance(raw, Mapping) else {}
    message = data.get("message")
    text = message if isinstance(message, str) else None
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None and load and isinstance(kind, str) and isinstance(module, str) and \
            _MODULE.fullmatch(module) and module not in sys.modules:
        with contextlib.suppress(ImportError):  # a module that is not there names no class
            importlib.import_module(module)
        cls = _REGISTRY.get(kind)
    if cls is None or cls is RemoteError:
        if cls is RemoteError and isinstance(fields.get("kind"), str):
            kind = fields["kind"]
        return RemoteError(message=text if text is not None else f"{kind}: {fields}",
                           code=code, kind=str(kind))
    return cls.rebuilt(fields, text)
