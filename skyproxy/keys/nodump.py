"""The daemon's memory stays its own: no core dump, and no other process of its user reads it.

The daemon holds every environment's key for as long as it runs. A process that is
dumpable (the default) can be read by any other process of the same user, through
/proc/PID/environ, /proc/PID/mem or a debugger, and its core dump lands on disk: a
browser extension or a package's install script running as the developer could copy
the production key out of a user service. PR_SET_DUMPABLE 0 closes all of these, as
ssh-agent and gpg-agent do; root keeps its access. The standard library has no
prctl(2), so it is called through ctypes.

Only the standard library is imported here: a test runs this file alone, as another user.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from typing import cast

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
_Prctl = Callable[[int, int, int, int, int], int]


def forbid_dumps() -> str | None:
    """Makes this process non-dumpable; None when done, else why not."""
    prctl = _prctl()
    if prctl is None:
        return "prctl(2) is not available on this platform"
    if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        return f"prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}"
    return None


def dumpable() -> bool | None:
    """Whether this process can be dumped or read by its user; None where that is unknown."""
    prctl = _prctl()
    if prctl is None:
        return None
    found = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    return None if found < 0 else found != 0


def _prctl() -> _Prctl | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return cast(_Prctl, function)
