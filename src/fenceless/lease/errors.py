"""Errors of the lease layer, fitted into the one hierarchy of ``fenceless.errors``.

A refusal before anything was written is a ``UserError``; losing a lease that
we held (or finding that we never were the writer any more) is ``LeaseLost``:
the caller must stop exclusive work at once. (A stale writer epoch, found in
any record, is ``ondisk.errors.StaleEpoch``.)
"""

from __future__ import annotations

from fenceless.errors import LeaseLost, UserError


class HostIdInUse(UserError):
    """Host id {host_id} is in use by {owner!r} (generation {generation}): {detail}"""


class HostNameInUse(UserError):
    """Host name {name!r} is already live on host id {other_id} (generation {generation}); \
two machines with the same name are refused, not merged"""


class BadHostIdentity(UserError):
    """Invalid host identity: {detail}"""


class HostLeaseLost(LeaseLost):
    """Host id {host_id} lease lost: {detail}"""


class LeaseExpired(LeaseLost):
    """Host id {host_id} lease expired: last renewal {age:.3f}s ago, the limit is {limit:.3f}s; \
exclusive work must stop now"""


class NotWriter(LeaseLost):
    """Host id {host_id} does not hold the writer lease at epoch {epoch}: {detail}"""
