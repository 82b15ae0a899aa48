"""Recording benchmarks; each prints one JSON line.

``python -m vqbet_core.recording.bench recorder --duration 60``
    recorder_node against fake_streams over real DDS (2 cameras 640x480 rgb8 at 30 Hz, joint states at
    500 Hz, teleop command at 30 Hz, control_hz 30): ticks dropped, CPU of the recorder, write throughput.
    Both run as child processes (ROS stays out of vqbet_core); the episode is driven through
    record_keyboard's piped input, so this process needs no rclpy. ``--transport shm`` (default) runs them
    with vqbet_bringup's Fast DDS profile (shared memory with a 16 MB segment, which 640x480 frames need to
    skip the network path); ``large_data`` / ``default`` are Fast DDS's builtin transports.
``python -m vqbet_core.recording.bench bag2zarr --seconds 20``
    a bag of the same streams written with rosbags, then MB/s of bag2zarr against MB/s of a plain rosbags
    read of the same bag (iterate only, and iterate + deserialize); ``--cold`` drops the page cache before each
    timed run (root), so the bag comes from the disk as a bag copied off the robot would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

JOINTS = ["panda_joint%d" % i for i in range(1, 8)] + ["panda_finger_joint1", "panda_finger_joint2"]
# vqbet_bringup's Fast DDS profile (the launch files load it too); a path only: vqbet_core does not import ROS
DDS_PROFILE = Path(__file__).resolve().parents[2] / "ros2_ws/src/vqbet_bringup/config/fastdds_large_images.xml"
TRANSPORTS = {"shm": "SHM 16 MB segment (fastdds_large_images.xml)",
              "large_data": "LARGE_DATA (builtin)", "default": "default (builtin)"}


def dds_env(env: dict, transport: str, profile: Path = DDS_PROFILE) -> dict:
    """``env`` with the Fast DDS transport settings of ``transport`` (shm, large_data or default); shared by the
    recorder bench and ``vqbet bench ros`` (which passes the installed profile when the checkout has none)."""
    env = dict(env)
    env.pop("FASTDDS_BUILTIN_TRANSPORTS", None)
    env.pop("FASTRTPS_DEFAULT_PROFILES_FILE", None)
    if transport == "shm":
        if not Path(profile).exists():
            raise FileNotFoundError(f"--transport shm: the Fast DDS profile {profile} is missing (this checkout "
                                    "lacks ros2_ws/); use --transport large_data or default")
        env["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(profile)
    elif transport == "large_data":
        env["FASTDDS_BUILTIN_TRANSPORTS"] = "LARGE_DATA"
    elif transport != "default":
        raise ValueError(f"unknown transport {transport!r} (choose from {', '.join(TRANSPORTS)})")
    return env


def _calibration(path: Path, cameras: list[str], control_hz: float, size: int) -> Path:
    lines = [f"robot: bench\ncontrol_hz: {control_hz}\njoint_names: [{', '.join(JOINTS)}]",
             "joint_limits: {lower: -10, upper: 10, velocity: 1}", "cameras:"]
    for name in cameras:
        lines.append(f"  {name}: {{topic: /{name}/image_raw, size: [{size}, {size}]}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------- recorder
def bench_recorder(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vqbet_bench_rec_"))
    env = dds_env(dict(os.environ, ROS_DOMAIN_ID=str(args.domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                       PYTHONUNBUFFERED="1"), args.transport)
    cams = [f"cam{i}" for i in range(args.cameras)]
    cal = _calibration(tmp / "cal.yaml", cams, args.control_hz, args.size)
    out = tmp / "bench.zarr"
    procs = []

    def start(name, argv, **kw):
        log = open(tmp / f"{name}.log", "wb")
        p = subprocess.Popen([sys.executable, *argv], env=env, stdout=kw.pop("stdout", log), stderr=subprocess.STDOUT,
                             cwd=tmp, start_new_session=True, **kw)
        procs.append(p)
        return p

    try:
        fake = ["-m", "vqbet_ros.fake_streams", "--joints", ",".join(JOINTS), "--joint-hz", str(args.joint_hz),
                "--camera-hz", str(args.camera_hz), "--command-hz", str(args.camera_hz), "--frames", "8",
                "--reliability", args.reliability, "--depth", str(args.pub_depth), "--log", str(tmp / "published.jsonl")]
        for name in cams:
            fake += ["--camera", f"{name}:/{name}/image_raw:rgb8:{args.width}x{args.height}"]
        pub = start("fake_streams", fake)
        rec = start("recorder", ["-m", "vqbet_ros.recorder_node", "--ros-args", "-p", f"output:={out}",
                                 "-p", f"calibration:={cal}", "-p", f"image_qos.reliability:={args.reliability}",
                                 "-p", f"min_free_mb:={args.min_free_mb}", "-p", "stop_free_mb:=1.0"])
        kb = start("keyboard", ["-m", "vqbet_ros.record_keyboard", "--ros-args", "-p", "timeout:=60.0"],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(args.warmup)  # discovery, and the streams flowing

        def command(key: str, expect: str) -> str:
            kb.stdin.write(key + "\n")
            kb.stdin.flush()
            while True:
                line = kb.stdout.readline()
                if not line:
                    raise RuntimeError(f"record_keyboard exited; recorder log: {(tmp / 'recorder.log').read_text()[-2000:]}")
                if line.startswith(("ok:", "refused:", "recorder service", "no answer")):
                    if not line.startswith(expect):
                        raise RuntimeError(f"{key}: {line.strip()}")
                    return line.strip()

        command("s", "ok: episode 0 started")
        cpu0, pub0, t0 = _cpu_seconds(rec.pid), _cpu_seconds(pub.pid), time.monotonic()
        time.sleep(args.duration)
        line = command("e", "ok: episode 0 committed")
        wall = time.monotonic() - t0
        cpu1, pub1 = _cpu_seconds(rec.pid), _cpu_seconds(pub.pid)
        steps, dropped, bad = (int(v) for v in re.findall(r"(\d+) steps, (\d+) ticks dropped, (\d+) bad", line)[0])
        found = re.findall(r"\(stale: (\{.*?\}), late: (\{.*?\})\)", line)
        stale, late = (json.loads(v.replace("'", '"')) for v in found[0]) if found else ({}, {})
        size = _du(out)
        for p in (pub, rec):  # stop both, so the publisher's log is complete
            p.send_signal(2)
            p.wait(20)
        gaps, by_recorder = _split_drops(tmp / "published.jsonl", out, args.control_hz, max_age=0.1)
        return {
            "bench": "recorder", "duration_s": round(wall, 1), "cameras": args.cameras,
            "camera": f"{args.width}x{args.height} rgb8 @ {args.camera_hz:g} Hz", "joint_hz": args.joint_hz,
            "control_hz": args.control_hz, "stored_image": f"{args.size}x{args.size}",
            "reliability": args.reliability, "transport": TRANSPORTS[args.transport],
            "large_data": args.transport == "large_data", "publisher_depth": args.pub_depth,
            "steps": steps, "ticks_dropped": dropped, "stale_by_stream": stale, "late_by_stream": late,
            "bad_messages": bad,
            "drop_rate": round(dropped / max(steps + dropped, 1), 4),
            "ticks_dropped_publisher_gaps": gaps, "ticks_dropped_by_recorder": by_recorder,
            "recorder_cpu_percent": round(100 * (cpu1 - cpu0) / wall, 1),
            "publisher_cpu_percent": round(100 * (pub1 - pub0) / wall, 1),
            "input_MB_per_s": round(args.cameras * args.width * args.height * 3 * args.camera_hz / 1e6, 1),
            "written_MB": round(size / 1e6, 2), "write_MB_per_s": round(size / 1e6 / wall, 3),
            "steps_per_s": round(steps / wall, 2), "machine_cpus": os.cpu_count(),
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(2)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _split_drops(published: Path, out: Path, control_hz: float, max_age: float) -> tuple[int, int]:
    """Drops the publisher caused (no message within max_age of a tick was ever sent - a starved
    publisher on a loaded machine) versus drops the recorder caused (sent, but not recorded in time)."""
    from vqbet_core.data.store import ZarrDataset

    stamps: dict[str, list] = {}
    for line in published.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        stamps.setdefault(rec["s"], []).append(rec["t"])
    period = int(round(1e9 / control_hz))
    written = np.round(ZarrDataset.open(out).read("timestamp") * 1e9 / period).astype(np.int64) * period
    grid = np.arange(written[0], written[-1] + 1, period)
    age = int(max_age * 1e9)
    ideal_ok = np.ones(len(grid), bool)
    for values in stamps.values():
        s = np.sort(np.array(values, dtype=np.int64))
        j = np.searchsorted(s, grid, side="right") - 1
        ideal_ok &= (j >= 0) & (grid - s[np.maximum(j, 0)] <= age)
    missing = ~np.isin(grid, written)
    return int(np.sum(missing & ~ideal_ok)), int(np.sum(missing & ideal_ok))


# ---------------------------------------------------------------------- bag2zarr
def write_bench_bag(path: Path, storage: str, seconds: float, cameras: int, width: int, height: int,
                    camera_hz: float, joint_hz: float) -> None:
    """A synthetic teleoperation bag: cameras (rgb8), joint states and a JointState command (each in its own
    joint order, not the calibration's)."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    T = ts.types
    rng = np.random.default_rng(0)

    def header(ns):
        return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9), frame_id="")

    frames = [rng.integers(0, 255, (height, width, 3), dtype=np.uint8).reshape(-1) for _ in range(4)]
    t0 = 1_700_000_000 * 10**9
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    # each publisher keeps one joint order (as joint_state_broadcaster does), not the calibration's
    joint_order, command_order = rng.permutation(len(JOINTS)), rng.permutation(len(JOINTS))
    events = []
    for k in range(int(seconds * camera_hz)):
        stamp = t0 + int(k * 1e9 / camera_hz)
        for c in range(cameras):
            events.append((stamp + 2_000_000, f"/cam{c}/image_raw", "sensor_msgs/msg/Image",
                           T["sensor_msgs/msg/Image"](header=header(stamp), height=height, width=width, encoding="rgb8",
                                                      is_bigendian=0, step=width * 3, data=frames[(k + c) % 4])))
        perm = command_order
        events.append((stamp + 1_000_000, "/teleop/joint_command", "sensor_msgs/msg/JointState",
                       T["sensor_msgs/msg/JointState"](header=header(stamp), name=[JOINTS[i] for i in perm],
                                                       position=np.arange(len(JOINTS), dtype=np.float64)[perm] + k,
                                                       velocity=np.zeros(0), effort=np.zeros(0))))
    for k in range(int(seconds * joint_hz)):
        stamp = t0 + int(k * 1e9 / joint_hz)
        perm = joint_order
        events.append((stamp + 500_000, "/joint_states", "sensor_msgs/msg/JointState",
                       T["sensor_msgs/msg/JointState"](header=header(stamp), name=[JOINTS[i] for i in perm],
                                                       position=np.arange(len(JOINTS), dtype=np.float64)[perm] * k,
                                                       velocity=np.zeros(0), effort=np.zeros(0))))
    events.sort(key=lambda e: e[0])
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for log, topic, msgtype, msg in events:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(conns[topic], log, ts.serialize_cdr(msg, msgtype))


def _settle(cold: bool) -> None:
    """Before a timed run: flush pending writes (the 1 GB bag just written, earlier outputs), so their
    writeback does not land in the timing; with ``cold``, also drop the page cache (Linux, root)."""
    os.sync()
    if cold:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        except OSError as exc:
            raise SystemExit(f"--cold: cannot drop the page cache ({exc}); run as root on Linux, or leave --cold out")


def bench_bag2zarr(args) -> dict:
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    from vqbet_core.calibration import load_calibration
    from vqbet_core.recording.bag2zarr import BagOptions, convert_bags, resolve_workers

    tmp = Path(tempfile.mkdtemp(prefix="vqbet_bench_bag_"))
    try:
        bag = Path(args.bag) if args.bag else tmp / "bench_bag"
        if not args.bag:
            write_bench_bag(bag, args.storage, args.seconds, args.cameras, args.width, args.height,
                            args.camera_hz, args.joint_hz)
        size = _du(bag)
        typestore = get_typestore(Stores.ROS2_JAZZY)
        timings = {"read": [], "read_deserialize": [], "bag2zarr": []}
        cal = load_calibration(_calibration(tmp / "cal.yaml", [f"cam{c}" for c in range(args.cameras)],
                                            args.control_hz, args.size))
        for rep in range(args.repeat):
            for mode in ("read", "read_deserialize"):
                _settle(args.cold)
                t = time.perf_counter()
                with AnyReader([bag], default_typestore=typestore) as reader:
                    for conn, _, raw in reader.messages():
                        if mode == "read_deserialize":
                            reader.deserialize(raw, conn.msgtype)
                timings[mode].append(time.perf_counter() - t)
            out = tmp / f"out{rep}.zarr"
            _settle(args.cold)
            t = time.perf_counter()
            reports = convert_bags([bag], cal, out, BagOptions(command_topic="/teleop/joint_command", min_free_mb=1,
                                                               workers=args.workers),
                                   progress=False, log=lambda line: None)
            timings["bag2zarr"].append(time.perf_counter() - t)
            if reports[0].error:
                raise RuntimeError(reports[0].error)
            steps = reports[0].episodes[0][1]
        best = {k: min(v) for k, v in timings.items()}
        mbps = {k: size / 1e6 / v for k, v in best.items()}
        return {
            "bench": "bag2zarr", "storage": args.storage if not args.bag else "given", "bag_MB": round(size / 1e6, 1),
            "bag_seconds": args.seconds, "page_cache": "dropped before each run" if args.cold else "warm",
            "cameras": args.cameras, "camera": f"{args.width}x{args.height} rgb8",
            "control_hz": args.control_hz, "steps": steps,
            "rosbags_read_MB_per_s": round(mbps["read"], 1),
            "rosbags_read_deserialize_MB_per_s": round(mbps["read_deserialize"], 1),
            "bag2zarr_MB_per_s": round(mbps["bag2zarr"], 1),
            "ratio_vs_read": round(mbps["bag2zarr"] / mbps["read"], 3),
            "ratio_vs_read_deserialize": round(mbps["bag2zarr"] / mbps["read_deserialize"], 3),
            "workers": resolve_workers(args.workers), "repeat": args.repeat, "machine_cpus": os.cpu_count(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqbet_core.recording.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="which", required=True)
    for name in ("recorder", "bag2zarr"):
        p = sub.add_parser(name)
        p.add_argument("--cameras", type=int, default=2)
        p.add_argument("--width", type=int, default=640)
        p.add_argument("--height", type=int, default=480)
        p.add_argument("--camera-hz", type=float, default=30.0)
        p.add_argument("--joint-hz", type=float, default=500.0)
        p.add_argument("--control-hz", type=float, default=30.0)
        p.add_argument("--size", type=int, default=96, help="stored image size (crop/resize per calibration)")
    rec = sub.choices["recorder"]
    rec.add_argument("--duration", type=float, default=600.0, help="seconds of recording (the figure: 600)")
    rec.add_argument("--warmup", type=float, default=5.0)
    rec.add_argument("--reliability", choices=("reliable", "best_effort"), default="reliable")
    rec.add_argument("--transport", choices=list(TRANSPORTS), default="shm",
                     help="Fast DDS transports of both processes: shm (FASTRTPS_DEFAULT_PROFILES_FILE = vqbet_bringup's "
                          "config/fastdds_large_images.xml), large_data (FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA) or "
                          "default (builtin transports)")
    rec.add_argument("--large-data", dest="transport", action="store_const", const="large_data",
                     help="same as --transport large_data (kept for old command lines)")
    rec.add_argument("--pub-depth", type=int, default=10, help="publisher history depth (a camera driver's is 1-10)")
    rec.add_argument("--domain-id", type=int, default=77)
    rec.add_argument("--min-free-mb", type=float, default=1024.0)
    rec.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, dataset)")
    bag = sub.choices["bag2zarr"]
    bag.add_argument("--seconds", type=float, default=20.0, help="length of the synthetic bag")
    bag.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    bag.add_argument("--bag", default=None, help="benchmark this bag instead (topics as the synthetic one)")
    bag.add_argument("--repeat", type=int, default=2, help="best of N runs")
    bag.add_argument("--workers", type=int, default=0, help="bag2zarr worker processes (0: one per CPU, 1: one pass)")
    bag.add_argument("--cold", action="store_true",
                     help="drop the page cache before each timed run, so the bag comes from the disk (needs root)")
    args = parser.parse_args(argv)
    if args.which == "recorder" and args.transport == "shm" and not DDS_PROFILE.exists():
        parser.error(f"--transport shm: the Fast DDS profile {DDS_PROFILE} is missing; use --transport large_data or default")
    result = bench_recorder(args) if args.which == "recorder" else bench_bag2zarr(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
