"""The policy node's ``cpus`` parameter: parsing, and pinning every thread of a process (not just the caller)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vqbet_ros.cpu_affinity import parse_cpus, pin_process


def test_parse_cpus():
    assert parse_cpus("") == set()
    assert parse_cpus("1") == {1}
    assert parse_cpus("0, 2") == {0, 2}
    assert parse_cpus("0,2-4") == {0, 2, 3, 4}
    for bad in ("a", "3-1", "-1", "1-x"):
        with pytest.raises(ValueError, match="cpus"):
            parse_cpus(bad)


def test_pin_process_moves_threads_started_before_it():
    """A thread started before pinning (as rclpy's DDS threads are) ends up on the chosen CPU too."""
    cpu = max(os.sched_getaffinity(0))
    code = f"""
import json, os, threading
from vqbet_ros.cpu_affinity import pin_process
stop = threading.Event()
early = threading.Thread(target=stop.wait); early.start()
moved = pin_process({{{cpu}}})
late = threading.Thread(target=stop.wait); late.start()
masks = {{t: os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}}
stop.set(); early.join(); late.join()
print(json.dumps({{"moved": moved, "masks": sorted({{tuple(sorted(m)) for m in masks.values()}}), "threads": len(masks)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["moved"] >= 2 and got["masks"] == [[cpu]] and got["threads"] == 3


def test_pin_process_rejects_unknown_cpus():
    with pytest.raises(ValueError, match="not CPUs of this machine"):
        pin_process({10_000})
    with pytest.raises(ValueError):
        pin_process(set())
