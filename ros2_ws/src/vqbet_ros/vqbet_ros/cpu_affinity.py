"""Pin a whole node process (every thread, the DDS ones included) to chosen CPUs.

Why: on a small robot computer the policy process shares cores with camera drivers and the controller;
when the scheduler moves the node's threads onto the core a camera driver is busy on, the frame ->
trajectory latency grows a tail. Pinning the node to its own core(s) removed a third of the p99 ROS
overhead in ``vqbet bench ros --pin`` on 2 cores. ``os.sched_setaffinity(0, ...)`` only moves the
calling thread on Linux, and rclpy has started the DDS threads before a node can read its parameters,
so every thread of ``/proc/self/task`` is moved; threads started later inherit the mask.
"""

from __future__ import annotations

import os
from pathlib import Path


def parse_cpus(text: str) -> set[int]:
    """``"1"``, ``"0,2"``, ``"2-3"`` or ``"0,2-3"`` -> CPU ids; ``""`` -> empty set (not pinned)."""
    cpus: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"cpus {text!r}: expected CPU ids like '1', '0,2' or '2-3'") from None
        if first < 0 or last < first:
            raise ValueError(f"cpus {text!r}: {part!r} is not a CPU id or an increasing range")
        cpus.update(range(first, last + 1))
    return cpus


def pin_process(cpus: set[int]) -> int:
    """Move every thread of this process to ``cpus``; returns how many threads were moved."""
    allowed = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
    unknown = sorted(set(cpus) - allowed)
    if not cpus or unknown:
        raise ValueError(f"cpus {sorted(cpus)}: not CPUs of this machine (it has {sorted(allowed)})")
    moved = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
            moved += 1
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return moved
