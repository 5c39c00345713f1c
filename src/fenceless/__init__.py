"""fenceless: one shared LUN, plain LVM2, one metadata writer, no cluster stack."""

__version__ = "0.1.0"
