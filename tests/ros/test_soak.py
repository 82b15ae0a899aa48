"""Soak tests: policy_node commanding for an hour, recorder_node recording one 30-minute episode.

Both run the real node as a child process over real DDS (loopback, private domain) and sample the node
process every ``VQBET_SOAK_SAMPLE_S`` seconds (default 30): resident memory (``VmRSS``, ``RssAnon``,
``RssFile`` from ``/proc/PID/status``), CPU time (``utime + stime`` from ``/proc/PID/stat``) and, for the
policy, the node's own latency p50/p99 from ``/diagnostics``. The check that matters is memory: RSS at the
end minus RSS at the end of the warm-up must stay below ``VQBET_SOAK_MAX_GROWTH_MB`` (default 5 MB).

Why 5 MB: a CPython process that allocates a few objects per step and frees them settles within about a
megabyte after warm-up (allocator arenas, onnxruntime's and DDS's pools are sized by then); a real leak
of one small object per control step (~100-200 bytes: a message, a deque entry, a numpy header) over an
hour at 10 Hz is 36000 objects, ~4-7 MB, and one per received camera frame (30 Hz) three times that,
so 5 MB catches the leaks that would matter on a robot that runs for a day while allowing allocator noise.

Marked ``slow`` (not in the default run). Run once, both concurrently if you like::

    VQBET_SOAK_S=3600 VQBET_SOAK_OUT=/tmp/soak_policy.json .venv/bin/python -m pytest -m slow \\
        tests/ros/test_soak.py -k policy -s
    VQBET_SOAK_RECORD_S=1800 VQBET_SOAK_OUT=/tmp/soak_recorder.json .venv/bin/python -m pytest -m slow \\
        tests/ros/test_soak.py -k recorder -s

``VQBET_SOAK_S`` / ``VQBET_SOAK_RECORD_S`` (seconds; defaults 3600 / 1800; 60 works for a quick check:
the warm-up is then a quarter of the run), ``VQBET_SOAK_IMAGE`` (the policy's camera, default 640x480
bgr8 at 30 Hz, published with the launch files' Fast DDS profile ``config/fastdds_large_images.xml``
unless FASTRTPS_DEFAULT_PROFILES_FILE is set), ``VQBET_SOAK_OUT`` (a JSON summary; ``{name}`` in it is
replaced by ``policy`` / ``recorder``; without it the summary is printed). Figures of the one real run:
docs/reference/safety.md, "Soak".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")

sys.path.insert(0, str(Path(__file__).parent))
import _recorder_support as S  # noqa: E402
from test_policy_node import SHIPPED_YAML, Peer, _calibration, build_tiny_model, ros_env  # noqa: E402

from vqbet_core.calibration import load_calibration  # noqa: E402

POLICY_S = float(os.environ.get("VQBET_SOAK_S", "3600"))
RECORD_S = float(os.environ.get("VQBET_SOAK_RECORD_S", "1800"))
SAMPLE_S = float(os.environ.get("VQBET_SOAK_SAMPLE_S", "30"))
MAX_GROWTH_MB = float(os.environ.get("VQBET_SOAK_MAX_GROWTH_MB", "5"))
IMAGE = os.environ.get("VQBET_SOAK_IMAGE", "640x480")
NODE = "/robot1/policy_node"
DDS_PROFILE = S.REPO / "ros2_ws/src/vqbet_bringup/config/fastdds_large_images.xml"

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def warmup_s(duration: float) -> float:
    return min(120.0, duration / 4)


# ---------------------------------------------------------------------- process sampling
class ProcSampler:
    """RSS and CPU time of one process from /proc."""

    def __init__(self, pid: int):
        self.pid, self.tick = pid, os.sysconf("SC_CLK_TCK")
        self.samples: list[dict] = []

    def read(self) -> dict:
        status = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        mem = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status
               if line.split(":")[0] in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; utime, stime are fields 14, 15
        cpu = (int(fields[11]) + int(fields[12])) / self.tick
        return {"t": time.time(), "cpu_s": cpu, "rss_mb": mem["VmRSS"], "anon_mb": mem["RssAnon"],
                "file_mb": mem["RssFile"], "hwm_mb": mem["VmHWM"]}

    def sample(self, **extra) -> dict:
        s = {**self.read(), **extra}
        self.samples.append(s)
        return s

    def at(self, t: float) -> dict:
        """The first sample at or after ``t``."""
        return next(s for s in self.samples if s["t"] >= t)

    @staticmethod
    def cpu_percent(a: dict, b: dict) -> float:
        return 100.0 * (b["cpu_s"] - a["cpu_s"]) / (b["t"] - a["t"])


def _summary(name: str, summary: dict) -> None:
    text = json.dumps(summary, indent=1)
    out = os.environ.get("VQBET_SOAK_OUT")
    if out:
        Path(out.replace("{name}", name)).write_text(text + "\n")
    print(f"\n--- {name} soak summary ---\n{text}")


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}


def _rounded(d: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}


# ---------------------------------------------------------------------- policy_node
class TrajectoryCounter:
    """Stands in for Peer.trajectories (a list that would hold an hour of messages): counts instead."""

    def __init__(self):
        self.count = 0
        self.last = 0.0

    def append(self, item) -> None:
        self.count += 1
        self.last = item[0]

    def __len__(self) -> int:
        return self.count


@pytest.mark.timeout(int(POLICY_S + 600))
def test_policy_node_soak(tmp_path, monkeypatch):
    w, h = (int(v) for v in IMAGE.split("x"))
    # as the launch files do: a 640x480 frame (921,600 bytes) does not fit Fast DDS's default 512 KB shared-memory
    # segment and goes over UDP fragments, which a best-effort subscriber on a loaded machine loses (the camera then
    # goes stale every few seconds and the node stops and restarts commanding); the publisher (the Peer, in this
    # process) needs the profile, the node gets it too
    monkeypatch.setenv("FASTRTPS_DEFAULT_PROFILES_FILE", os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE", str(DDS_PROFILE)))
    model = build_tiny_model(tmp_path)
    cal_path = _calibration(tmp_path / "node_cal.yaml")
    cal = load_calibration(cal_path)
    joints = (cal.lower + cal.upper) / 2
    env = ros_env()
    log_path = tmp_path / "policy_node.log"
    args = [sys.executable, "-m", "vqbet_ros.policy_node", "--ros-args", "-r", "__ns:=/robot1",
            "--params-file", str(SHIPPED_YAML), "-p", f"model:={model}", "-p", f"calibration:={cal_path}",
            "-p", "task_sequence:=[microwave]", "-p", "advance_on_completion:=false", "-p", "threads:=1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    peer = None
    try:
        peer = Peer(int(env["ROS_DOMAIN_ID"]), cal.joint_names, joints)
        peer.rgb = np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)  # the soak's camera size
        peer.trajectories = TrajectoryCounter()
        try:
            peer.get_parameters(["max_age"])
        except AssertionError:
            raise AssertionError(f"policy_node did not come up: {log_path.read_text()[-3000:]}") from None
        assert peer.enable(True).success
        sampler = ProcSampler(proc.pid)
        t0 = time.time()
        t_warm, t_end = t0 + warmup_s(POLICY_S), t0 + POLICY_S
        sampler.sample(trajectories=0)
        windows = []  # trajectories received in each sampling interval
        while time.time() < t_end:
            time.sleep(max(0.0, min(SAMPLE_S, t_end - time.time())))
            assert proc.poll() is None, f"policy_node exited: {log_path.read_text()[-3000:]}"
            diag = dict(peer.diagnostics[-1]) if peer.diagnostics else {}
            prev = sampler.samples[-1]
            s = sampler.sample(trajectories=peer.trajectories.count, p50_ms=float(diag.get("latency_p50_ms", "nan")),
                               p99_ms=float(diag.get("latency_p99_ms", "nan")),
                               internal_errors=int(diag.get("internal_errors", -1)), stops=int(diag.get("stops", -1)))
            windows.append((s["trajectories"] - prev["trajectories"]) / (s["t"] - prev["t"]))
            print(f"[policy soak] {s['t'] - t0:7.0f} s  rss {s['rss_mb']:.1f} MB  anon {s['anon_mb']:.1f} MB  "
                  f"cpu {ProcSampler.cpu_percent(prev, s):.0f} %  p50 {s['p50_ms']:.1f} ms  p99 {s['p99_ms']:.1f} ms  "
                  f"traj {s['trajectories']}  stops {s['stops']}", flush=True)
        final_diag = dict(peer.diagnostics[-1])
        first, warm, last = sampler.samples[0], sampler.at(t_warm), sampler.samples[-1]
        tail = sampler.at(last["t"] - (warm["t"] - first["t"]))  # a window at the end as long as the warm-up
        summary = {
            "duration_s": round(last["t"] - first["t"], 1), "warmup_s": round(warm["t"] - first["t"], 1),
            "camera": f"{w}x{h} bgr8 at 30 Hz, joint_states at 100 Hz",
            "dds_profile": os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"], "control_hz": 10, "onnx_threads": 1,
            "rss_mb": {"start": round(first["rss_mb"], 2), "after_warmup": round(warm["rss_mb"], 2),
                       "end": round(last["rss_mb"], 2), "growth_after_warmup": round(last["rss_mb"] - warm["rss_mb"], 2),
                       "max": round(max(s["rss_mb"] for s in sampler.samples), 2)},
            "anon_mb": {"after_warmup": round(warm["anon_mb"], 2), "end": round(last["anon_mb"], 2)},
            "cpu_percent": {"warmup": round(ProcSampler.cpu_percent(first, warm), 1),
                            "end": round(ProcSampler.cpu_percent(tail, last), 1),
                            "whole_run": round(ProcSampler.cpu_percent(first, last), 1)},
            "latency_ms": {"after_warmup": {"p50": warm["p50_ms"], "p99": warm["p99_ms"]},
                           "end": {"p50": last["p50_ms"], "p99": last["p99_ms"]}},
            "trajectories": peer.trajectories.count,
            "trajectories_per_s_min_window": round(min(windows), 2),
            "steps": int(final_diag.get("steps", -1)), "stops": int(final_diag.get("stops", -1)),
            "skipped_steps": int(final_diag.get("skipped_steps", -1)),
            "internal_errors": int(final_diag["internal_errors"]),
            "machine": _machine(), "samples": [_rounded(s) for s in sampler.samples],
        }
        _summary("policy", summary)
        assert final_diag["enabled"] == "True"
        assert int(final_diag["internal_errors"]) == 0
        # commanding throughout: every sampling window has trajectories at well over half the 10 Hz rate
        assert min(windows) >= 5.0, windows
        assert time.time() - peer.trajectories.last < 1.0
        assert last["rss_mb"] - warm["rss_mb"] < MAX_GROWTH_MB, summary["rss_mb"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if peer is not None:
            peer.close()


# ---------------------------------------------------------------------- recorder_node
@pytest.mark.timeout(int(RECORD_S + 600))
def test_recorder_soak(tmp_path):
    import zarr

    env = S.ros_env()
    cal = S.write_calibration(tmp_path)
    control_hz = load_calibration(cal).control_hz
    out = tmp_path / "soak.zarr"
    procs = S.Procs(env, tmp_path)
    client = None
    try:
        fake_args = ["-m", "vqbet_ros.fake_streams", "--joints", ",".join(S.JOINTS), "--joint-hz", "100",
                     "--shuffle", "--frames", "16", "--depth", "200"]
        for name, (topic, enc, w, h) in S.CAMERAS.items():
            fake_args += ["--camera", f"{name}:{topic}:{enc}:{w}x{h}"]
        fake = procs.start("fake", fake_args)
        rec = procs.start("recorder", S.recorder_args(out, cal, {"status_period": 1.0, "image_qos.depth": 50,
                                                                 "state_qos.depth": 500}))
        client = S.Client(int(env["ROS_DOMAIN_ID"]))
        client.wait_ready(proc=rec)
        client.spin(2.0)
        start = client.call("start_episode")
        assert start.success, start.message
        sampler = ProcSampler(rec.pid)
        t0 = time.time()
        t_warm, t_end = t0 + warmup_s(RECORD_S), t0 + RECORD_S
        sampler.sample(length=0)
        while time.time() < t_end:
            client.spin(max(0.0, min(SAMPLE_S, t_end - time.time())))
            assert rec.poll() is None, f"recorder exited: {rec.log_path.read_text()[-3000:]}"
            assert fake.poll() is None, "fake_streams exited"
            st = client.status[-1]
            prev = sampler.samples[-1]
            s = sampler.sample(length=st.get("length", -1), dropped=st.get("dropped", -1), state=st.get("state"))
            print(f"[recorder soak] {s['t'] - t0:7.0f} s  rss {s['rss_mb']:.1f} MB  anon {s['anon_mb']:.1f} MB  "
                  f"cpu {ProcSampler.cpu_percent(prev, s):.0f} %  length {s['length']}  dropped {s['dropped']}", flush=True)
            assert st["state"] == "recording", st
        t_stop = time.time()
        end = client.call("end_episode", timeout=60)
        assert end.success, end.message
        final_status = client.status[-1]
        first, warm, last = sampler.samples[0], sampler.at(t_warm), sampler.samples[-1]
        tail = sampler.at(last["t"] - (warm["t"] - first["t"]))
        assert procs.stop(rec, timeout=30) == 0, rec.log_path.read_text()[-3000:]
        procs.stop(fake)
        # plain zarr (no project code) reads the whole episode back
        root = zarr.open_group(str(out), mode="r")
        ends = np.asarray(root["meta/episode_ends"][:])
        n = int(ends[-1])
        lengths = {k: root["data"][k].shape[0] for k in root["data"].array_keys()}
        ts = np.asarray(root["data/timestamp"][:])
        front = np.asarray(root["data/camera_front"][-100:])
        expected = (t_stop - t0) * control_hz
        summary = {
            "recording_s": round(t_stop - t0, 1), "warmup_s": round(warm["t"] - first["t"], 1), "control_hz": control_hz,
            "streams": "joint_states 100 Hz (shuffled names), command 30 Hz, front 64x48 bgr8 + wrist 64x48 png at 30 Hz",
            "rss_mb": {"start": round(first["rss_mb"], 2), "after_warmup": round(warm["rss_mb"], 2),
                       "end": round(last["rss_mb"], 2), "growth_after_warmup": round(last["rss_mb"] - warm["rss_mb"], 2),
                       "max": round(max(s["rss_mb"] for s in sampler.samples), 2)},
            "anon_mb": {"after_warmup": round(warm["anon_mb"], 2), "end": round(last["anon_mb"], 2)},
            "cpu_percent": {"warmup": round(ProcSampler.cpu_percent(first, warm), 1),
                            "end": round(ProcSampler.cpu_percent(tail, last), 1),
                            "whole_run": round(ProcSampler.cpu_percent(first, last), 1)},
            "episode_ends": ends.tolist(), "steps": n, "expected_steps": round(expected, 1),
            "dropped": final_status.get("dropped"), "stale": final_status.get("stale"), "bad": final_status.get("bad"),
            "array_lengths": lengths, "end_message": end.message,
            "machine": _machine(), "samples": [_rounded(s) for s in sampler.samples],
        }
        _summary("recorder", summary)
        assert len(ends) == 1 and all(v == n for v in lengths.values()), (ends, lengths)
        # one step per tick, a few ticks dropped when a loaded machine delays a stream beyond max_age
        assert 0.97 * expected <= n <= expected + control_hz, (n, expected)
        assert np.all(np.diff(ts) > 0) and ts[-1] - ts[0] == pytest.approx((t_stop - t0), abs=5.0)
        assert front.shape == (100, 24, 32, 3) and front.std() > 0
        assert last["rss_mb"] - warm["rss_mb"] < MAX_GROWTH_MB, summary["rss_mb"]
    finally:
        if client is not None:
            client.close()
        procs.close()
