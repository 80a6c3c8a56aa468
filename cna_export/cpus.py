"""How many threads compute-bound work should use: the physical cores this process may run on.

llama.cpp's threads wait for each other at every graph node by spinning, so a second thread on a core's
hyper-thread sibling (or on a core this process may not use) slows every step down rather than speeding it up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

_TOPOLOGY = "/sys/devices/system/cpu/cpu{}/topology/{}"


def _read_topology(cpu: int, name: str) -> str | None:
    try:
        return Path(_TOPOLOGY.format(cpu, name)).read_text().strip()
    except OSError:
        return None


def physical_cores(cpus: Iterable[int] | None = None, read: Callable[[int, str], str | None] = _read_topology) -> int:
    """The number of distinct physical cores among `cpus` (default: the CPUs this process may use).

    Hyper-thread siblings share a (package, core) pair in Linux's sysfs topology; where that is unreadable (other
    systems, restricted containers) every CPU counts as a core.

    Example:
        >>> physical_cores([0, 1, 2, 3], lambda cpu, name: str(cpu % 2) if name == "core_id" else "0")
        2
    """
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cpus = sorted(cpus)
    cores = set()
    for cpu in cpus:
        core, package = read(cpu, "core_id"), read(cpu, "physical_package_id")
        if core is None or package is None:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))
