"""The watchdog: what makes a lease safe when its holder cannot stop itself.

A frozen agent (SIGSTOP, a VM stun, a hung path) cannot stop the LVM command
it started, nor its VMs; every shared write is check-then-write, so a pause
between the check and the write lets the write land after another host took
over. sanlock answers this with wdmd and a hardware watchdog; fenceless has
a small daemon per host (``fenceless watchdog``), separate from the agent:

- the agent *arms* it for each VG while it holds exclusive work there (the
  writer role, or LVs mapped on this host), and re-arms it after every good
  renewal with a deadline of 10N after that renewal; it *disarms* a VG once
  it holds nothing exclusive there;
- past a deadline the watchdog fires: it kills the agent and everything in
  the host's work cgroup (the writer's LVM children, later its VMs), as a
  reset would, and records when; with ``/dev/watchdog`` it also stops petting
  the device if something survives the kill, so the hardware resets the host;
- others may take over only at 14N: the watchdog has fired 4N before.

Docs: docs/design.md, "The watchdog".
"""
