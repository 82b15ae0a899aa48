"""SIGINT, a double SIGINT and SIGTERM (alone and followed by a SIGINT) at random moments to a recorder_node
with an episode open: every stop must end the process with status 0 and no traceback, the open episode must be
committed (``on_shutdown: commit``), and plain zarr (no vqbet code) must read back every committed episode
with its length, with no uncommitted leftovers in the arrays.

The default run stops the recorder once per kind; the 20-stop campaign is behind the slow marker and prints
its figures (``pytest -m slow -s tests/ros/test_recorder_signals.py``).
"""

from __future__ import annotations

import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

sys.path.insert(0, str(Path(__file__).parent))
import _recorder_support as S  # noqa: E402

pytestmark = pytest.mark.ros
HZ = 50.0
# (name, signals sent one after the other); the gap between two is random, 0-0.3 s
KINDS = [("SIGINT", [signal.SIGINT]), ("SIGINT x2", [signal.SIGINT, signal.SIGINT]),
         ("SIGTERM", [signal.SIGTERM]), ("SIGTERM + SIGINT", [signal.SIGTERM, signal.SIGINT])]
COMMITTED_AT_SHUTDOWN = re.compile(r"recorder_node: committed episode (\d+) \((\d+) steps\) at shutdown")


def _read_plain(out: Path) -> tuple[list[int], dict[str, int]]:
    import zarr

    root = zarr.open_group(str(out), mode="r")
    ends = [int(e) for e in root["meta/episode_ends"][:]]
    return ends, {k: int(root["data"][k].shape[0]) for k in root["data"].array_keys()}


def _wait_status(client, proc, predicate, timeout=30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"recorder exited ({proc.returncode}): {proc.log_path.read_text()[-2000:]}")
        for status in reversed(client.status):
            if predicate(status):
                return status
        client.spin(0.02)
    raise AssertionError(f"no such recorder status within {timeout} s: {client.status[-1:]}")


def _start(client) -> int:
    """start_episode, retried while the recorder refuses it (streams still being discovered); the index."""
    for _ in range(100):
        started = client.call("start_episode")
        if started.success:
            return int(re.search(r"episode (\d+) started", started.message).group(1))
        client.spin(0.05)
    raise AssertionError(f"start_episode refused: {started.message}")


def run_stops(tmp: Path, stops: int, seed: int) -> dict:
    rng = random.Random(seed)
    env = S.ros_env()
    cal = S.write_calibration(tmp)
    out = tmp / "signals.zarr"
    procs = S.Procs(env, tmp)
    client = None
    committed: dict[int, int] = {}  # episode -> length, acknowledged by end_episode or the shutdown log line
    figures = {"stops": 0, "kinds": {}, "committed_at_shutdown": 0, "committed_by_service": 0, "lost": 0,
               "tracebacks": 0, "exit_s": []}
    kinds = [KINDS[i % len(KINDS)] for i in range(stops)]
    rng.shuffle(kinds)
    try:
        procs.start("fake", S.fake_streams_args(tmp / "pub.jsonl", joint_hz=100))
        client = S.Client(int(env["ROS_DOMAIN_ID"]))
        for cycle, (kind, signals) in enumerate(kinds):
            rec = procs.start(f"rec{cycle}", S.recorder_args(out, cal, {"flush_every": 5, "control_hz": HZ,
                                                                        "status_period": 0.05}))
            client.status.clear()
            client.wait_ready(proc=rec)
            _wait_status(client, rec, lambda s: s["state"] == "idle" and "robot_joint" in s["max_latency_s"])
            for _ in range(rng.randrange(2)):  # sometimes an episode ended the normal way first
                _start(client)
                client.spin(rng.uniform(0.1, 0.4))
                res = client.call("end_episode")
                if res.success:
                    index, rest = res.message.split(" committed: ")
                    committed[int(index.split()[1])] = int(rest.split()[0])
                    figures["committed_by_service"] += 1
            index = _start(client)
            # this episode's status (the client may still hold status messages of the previous process)
            _wait_status(client, rec, lambda s: s["state"] == "recording" and s["episode"] == index and s["length"] >= 1)
            client.spin(rng.uniform(0.0, 1.0))  # a random moment of the open episode
            t0 = time.monotonic()
            for i, sig in enumerate(signals):
                if i:
                    time.sleep(rng.uniform(0.0, 0.3))
                if rec.poll() is None:
                    rec.send_signal(sig)
            try:
                code = rec.wait(20)
            except Exception:  # noqa: BLE001 - TimeoutExpired: reported below
                code = None
            figures["exit_s"].append(round(time.monotonic() - t0, 3))
            log = rec.log_path.read_text()
            figures["stops"] += 1
            figures["kinds"][kind] = figures["kinds"].get(kind, 0) + 1
            figures["tracebacks"] += log.count("Traceback")
            assert code == 0, f"cycle {cycle} ({kind}, seed {seed}): exit {code}\n{log[-3000:]}"
            assert "Traceback" not in log and "KeyboardInterrupt" not in log, f"cycle {cycle} ({kind}):\n{log[-3000:]}"
            match = COMMITTED_AT_SHUTDOWN.search(log)
            assert match, f"cycle {cycle} ({kind}, seed {seed}): the open episode was not committed\n{log[-3000:]}"
            committed[int(match.group(1))] = int(match.group(2))
            figures["committed_at_shutdown"] += 1
            ends, lengths = _read_plain(out)
            steps = [b - a for a, b in zip([0] + ends[:-1], ends)]
            lost = [i for i, n in committed.items() if i >= len(steps) or steps[i] != n]
            figures["lost"] += len(lost)
            assert not lost, f"cycle {cycle} ({kind}): episodes {lost} lost or changed: store {steps}, acknowledged {committed}"
            assert len(steps) == len(committed), f"store has {len(steps)} episodes, {len(committed)} acknowledged"
            assert set(lengths.values()) == {ends[-1]}, f"uncommitted leftovers after a clean stop: {lengths} vs {ends[-1]}"
    finally:
        if client is not None:
            client.close()
        procs.close()
    figures["episodes_in_store"] = len(committed)
    figures["exit_s_max"] = max(figures["exit_s"]) if figures["exit_s"] else None
    return figures


@pytest.mark.timeout(240)
def test_each_stop_signal_commits_the_open_episode(tmp_path):
    seed = random.randrange(1 << 30)
    figures = run_stops(tmp_path, stops=len(KINDS), seed=seed)
    assert figures["lost"] == 0 and figures["tracebacks"] == 0, (seed, figures)
    print(f"seed {seed}: {figures}")


@pytest.mark.slow  # 1.5-3 minutes
@pytest.mark.timeout(900)
def test_twenty_signal_stops_lose_nothing(tmp_path):
    seed = random.randrange(1 << 30)
    figures = run_stops(tmp_path, stops=20, seed=seed)
    print(f"20 stops, seed {seed}: {figures}")
    assert figures["stops"] == 20 and figures["lost"] == 0 and figures["tracebacks"] == 0, (seed, figures)
