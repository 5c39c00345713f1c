"""The guard: on hosts that are not the metadata writer, LVM itself runs read-only.

The distribution's LVM binary is moved aside with the package manager's own
mechanism (dpkg-divert) and replaced by a small sh wrapper, so that a
colleague who types ``lvcreate`` on the wrong host is refused instead of
corrupting the shared VG, and package upgrades keep the wrapper in place.
"""
