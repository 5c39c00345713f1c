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

Only ``cli.main`` prints errors and exits; everything else raises.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FencelessError(Exception):
    """{detail}"""

    exit_code: ClassVar[int] = 1

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        super().__init__(self.message)

    @property
    def message(self) -> str:
        template = (type(self).__doc__ or "{detail}").strip()
        try:
            return template.format(**self.fields)
        except (KeyError, IndexError):
            # A template/field mismatch must never hide the original error.
            return f"{template} {self.fields!r}"

    def __str__(self) -> str:
        return self.message


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
