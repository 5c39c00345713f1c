"""The hypervisor driver: libvirt (KVM and QEMU, Xen through libxl), one URI per host.

Domains are started *transient* (``createXML``) from the definition on the
LUN: no host keeps a persistent copy that could go stale or be started by
hand behind fenceless's back. libvirt-python is imported when a driver is
first used, so commands that never touch a VM do not pay for it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from fenceless.errors import ExecError, UserError


class HypervisorError(ExecError):
    """The hypervisor at {uri} failed to {action} VM {name}: {detail}"""


class NoHypervisor(UserError):
    """Refused: this host has no hypervisor configured (hypervisor_uri in {config}); \
nothing was changed"""


class StopTimedOut(ExecError):
    """VM {name} did not shut down within {timeout:.0f}s; run `fenceless vm stop {name} \
--force` to destroy it (its disks stay mapped meanwhile)"""


class LibvirtDriver:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None

    def conn(self) -> Any:
        if self._conn is None:
            import libvirt  # the optional dependency: only VM commands need it

            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorError(uri=self.uri, action="connect for", name="-",
                                      detail=str(exc)) from exc
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def running(self) -> list[str]:
        import libvirt

        try:
            return sorted(d.name() for d in self.conn().listAllDomains(
                libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
        except libvirt.libvirtError as exc:
            raise HypervisorError(uri=self.uri, action="list", name="(all)",
                                  detail=str(exc)) from exc

    def is_running(self, name: str) -> bool:
        """Whether a domain of this name is active here (running or paused)."""
        return name in self.running()

    def paused_by_migration(self, name: str) -> bool:
        """Whether the domain is paused by a live migration that did not finish (its
        guest was handed to the target, or is waiting to be resumed here)."""
        import libvirt

        try:
            state, reason = self.conn().lookupByName(name).state()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise HypervisorError(uri=self.uri, action="look up", name=name,
                                  detail=str(exc)) from exc
        return bool(state == libvirt.VIR_DOMAIN_PAUSED
                    and reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION)

    def resume(self, name: str) -> None:
        import libvirt

        try:
            self.conn().lookupByName(name).resume()
        except libvirt.libvirtError as exc:
            raise HypervisorError(uri=self.uri, action="resume", name=name,
                                  detail=str(exc)) from exc

    def migrate_live(self, name: str, dest: LibvirtDriver, paths: dict[str, str], *,
                     uri: str | None, timeout: float) -> None:
        """Migrate the running domain ``name`` live from this daemon to ``dest``'s, with
        each disk (by target: ``paths``) at the path the destination mapped it on.

        The client drives it (a managed migration): this process holds both
        connections, and libvirt resumes the guest here if anything fails. Past
        ``timeout`` the migration is aborted, so a guest that dirties memory faster than
        it can be sent stays where it runs instead of holding two hosts' disks forever.
        """
        import libvirt

        from fenceless.hv.domain import with_target_paths

        try:
            dom = self.conn().lookupByName(name)
            xml = with_target_paths(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), paths)
        except libvirt.libvirtError as exc:
            raise HypervisorError(uri=self.uri, action="read for migration", name=name,
                                  detail=str(exc)) from exc
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml}
        if uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = uri
        timer = threading.Timer(timeout, self._abort, (dom,))
        timer.start()
        try:
            dom.migrate3(dest.conn(), params, libvirt.VIR_MIGRATE_LIVE)
        except libvirt.libvirtError as exc:
            raise HypervisorError(uri=self.uri, action="migrate", name=name,
                                  detail=str(exc)) from exc
        finally:
            timer.cancel()

    @staticmethod
    def _abort(dom: Any) -> None:
        import libvirt

        with contextlib.suppress(libvirt.libvirtError):  # it finished or failed meanwhile
            dom.abortJob()

    def start(self, name: str, xml: str) -> None:
        import libvirt

        try:
            self.conn().createXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(uri=self.uri, action="start", name=name,
                                  detail=str(exc)) from exc

    def stop(self, name: str, *, force: bool, timeout: float = 60.0) -> bool:
        """Stop the domain: destroy (``force``), or ask the guest and wait. False if it
        was not running here."""
        import libvirt

        try:
            dom = self.conn().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False  # not running here (a transient domain is gone once stopped)
            raise HypervisorError(uri=self.uri, action="look up", name=name,
                                  detail=str(exc)) from exc
        try:
            if force:
                dom.destroy()
                return True
            dom.shutdown()
            deadline = time.monotonic() + timeout
            while dom.isActive():
                if time.monotonic() > deadline:
                    raise StopTimedOut(name=name, timeout=timeout)
                time.sleep(0.2)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN,
                                        libvirt.VIR_ERR_OPERATION_INVALID):
                return True  # it went away (or was not running) meanwhile
            raise HypervisorError(uri=self.uri, action="stop", name=name,
                                  detail=str(exc)) from exc
        return True
