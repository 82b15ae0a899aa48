"""``vqbet bench ros``: image published -> trajectory received latency through a real policy_node process.

Why measured this way: what the robot feels is the time from a camera frame to the trajectory that
reacts to it, and the part the ROS shell adds on top of the runtime's own step (message transport both
ways, image conversion, queues, safety math, publishing) is the number to keep small. The node runs
with ``trigger: camera`` (each frame starts a step, stamped with the frame's header stamp) and
``publish_timing`` (its runtime step time per step on ``~/step_timing``), so every trajectory is
matched to its frame by stamp and ``overhead = end-to-end - runtime step`` is computed per step, in the
same run. Prints one JSON line.

Transport (``--transport``, both processes): ``shm`` (default) loads vqbet_bringup's Fast DDS profile
``config/fastdds_large_images.xml`` (shared memory with a 16 MB segment, as the launch files do), so a
640x480 image (900 KB) goes through shared memory instead of the network path it takes with the builtin
transports, whose segment is 512 KB; ``large_data`` and ``default`` are the builtin transports.

Run: ``vqbet bench ros --model models/NAME [--calibration C.yaml] [--steps 1000] [--transport shm]``
(or ``python -m vqbet_ros.bench_ros ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from vqbet_core.recording.bench import DDS_PROFILE, TRANSPORTS, dds_env
from vqbet_ros.cpu_affinity import pin_process

REPO = Path(__file__).resolve().parents[4]


def dds_profile() -> Path:
    """vqbet_bringup's Fast DDS profile: this checkout's copy, else the installed one (colcon workspace)."""
    if DDS_PROFILE.exists():
        return DDS_PROFILE
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory("vqbet_bringup")) / "config" / DDS_PROFILE.name
        if installed.exists():
            return installed
    except (ImportError, LookupError, OSError, ValueError):  # not found: KeyError; no AMENT_PREFIX_PATH: OSError
        pass
    from vqbet_core.errors import VqbetError

    raise VqbetError(f"--transport shm: no Fast DDS profile at {DDS_PROFILE} (nor an installed vqbet_bringup); "
                     "use --transport large_data or default")


def _stats(values) -> dict:
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {"p50": None, "p99": None, "max": None, "mean": None}
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "max": round(float(a.max()), 3), "mean": round(float(a.mean()), 3)}


def _match(stamps: list[int], keyed: dict, tol_ns: int = 2000) -> dict[int, int]:
    """Published stamp -> the key of ``keyed`` within ``tol_ns`` of it (stamps are unique, > 1 ms apart)."""
    keys = np.array(sorted(keyed), dtype=np.int64)
    out = {}
    if keys.size == 0:
        return out
    for s in stamps:
        i = int(np.searchsorted(keys, s))
        for j in (i - 1, i):
            if 0 <= j < keys.size and abs(int(keys[j]) - s) <= tol_ns:
                out[s] = int(keys[j])
                break
    return out


def trajectory_stamp_ns(raw: bytes) -> int:
    """Header stamp (ns) of a serialized message that starts with a ``std_msgs/Header`` (plain CDR)."""
    order = "<" if raw[1] == 1 else ">"
    sec, nanosec = struct.unpack_from(order + "iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


def parse_args(argv):
    p = argparse.ArgumentParser(prog="vqbet bench ros", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported model folder with a camera (vqbet export)")
    # resolved at run time, so the documented default does not depend on where the checkout lives
    p.add_argument("--calibration", default=None,
                   help="calibration YAML (joints, camera topic); default: calibration/franka_sim.yaml")
    p.add_argument("--steps", type=int, default=1000, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=30, help="steps not measured (onnxruntime and DDS warm-up)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="camera frames per second, each one a policy step (default: the model's control_hz); keep it "
                        "below the node's throughput, or queueing is measured instead of overhead")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--encoding", default="rgb8", choices=["rgb8", "bgr8"])
    p.add_argument("--transport", default="shm", choices=list(TRANSPORTS),
                   help="Fast DDS transports of both processes: shm (default; FASTRTPS_DEFAULT_PROFILES_FILE = "
                        "vqbet_bringup's config/fastdds_large_images.xml, shared memory with a 16 MB segment), "
                        "large_data (FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA) or default (builtin transports)")
    p.add_argument("--reliability", default="reliable", choices=["reliable", "best_effort"], help="image QoS")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads in the node")
    p.add_argument("--pin", action="store_true",
                   help="pin the node to the last CPU (its cpus parameter) and this process (camera + controller "
                        "stand-ins) to the others, as on a robot computer")
    p.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (0: 3x the planned time + 60)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from vqbet_core.calibration import load_calibration
    from vqbet_core.errors import VqbetError
    from vqbet_core.runtime import load_spec

    if not args.calibration:
        default_cal = REPO / "calibration" / "franka_sim.yaml"
        if not default_cal.exists():
            raise VqbetError("--calibration is required (no calibration/franka_sim.yaml next to this checkout)")
        args.calibration = str(default_cal)
    spec = load_spec(args.model)
    calib = load_calibration(args.calibration)
    if not spec.image_keys:
        raise VqbetError(f"--model {args.model}: has no camera; the ROS benchmark measures image -> trajectory")
    camera = spec.image_keys[0][len("camera_"):]
    if camera not in calib.cameras:
        raise VqbetError(f"--calibration {args.calibration}: has no camera '{camera}' (the model's camera)")
    args.rate = args.rate or spec.control_hz
    if args.steps < 1 or args.rate <= 0:
        raise VqbetError("--steps must be >= 1 and --rate > 0")

    # the environment (domain, transports) must be set before rclpy starts, here and in the node
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = os.environ.get("VQBET_BENCH_DOMAIN", str(100 + random.randrange(100)))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env = dds_env(env, args.transport, dds_profile() if args.transport == "shm" else DDS_PROFILE)
    os.environ.clear()
    os.environ.update(env)

    node_args = [sys.executable, "-m", "vqbet_ros.policy_node", "--ros-args",
                 "-p", f"model:={args.model}", "-p", f"calibration:={args.calibration}", "-p", "trigger:=camera",
                 "-p", f"control_hz:={args.rate}", "-p", "enabled:=true", "-p", "publish_timing:=true",
                 "-p", "max_age:=1.0", "-p", f"image_qos.reliability:={args.reliability}",
                 "-p", f"threads:={args.threads}", "-p", "diagnostics_period:=5.0"]
    if spec.goal_names:
        node_args += ["-p", f"task_sequence:=[{spec.goal_names[0]}]"]
    log = tempfile.NamedTemporaryFile("w+", prefix="bench_ros_policy_node_", suffix=".log", delete=False)
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin:  # the node by its cpus parameter, as users pin it; this process (all threads) to the rest
        if len(cpus) < 2:
            raise VqbetError("--pin needs at least 2 CPUs")
        node_args += ["-p", f"cpus:={cpus[-1]}"]
        pin_process(set(cpus[:-1]))
    proc = subprocess.Popen(node_args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log.name
    log.close()
    try:
        result = _measure(args, spec, calib, camera, proc)
        os.unlink(proc.log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    result.update({"transport": TRANSPORTS[args.transport],
                   "image_reliability": args.reliability, "node_threads": args.threads, "cpu_count": os.cpu_count(),
                   "pinned": bool(args.pin),
                   "load_average_1min": round(os.getloadavg()[0], 2)})
    print(json.dumps(result))
    return 0


def _measure(args, spec, calib, camera: str, proc) -> dict:
    import rclpy
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Float64MultiArray
    from std_srvs.srv import SetBool
    from trajectory_msgs.msg import JointTrajectory

    from vqbet_core.errors import VqbetError
    from vqbet_ros import ros_convert
    from vqbet_ros.policy_node import TIMING_FIELDS, make_executor
    from vqbet_ros.qos import make_qos

    context = rclpy.Context()
    rclpy.init(context=context)
    pub_node = rclpy.create_node("bench_ros_publisher", context=context)
    sub_node = rclpy.create_node("bench_ros_receiver", context=context)
    # the bench's own executors stand in for C++ processes: the EventsExecutor, as the node runs
    executors = [make_executor("events", context=context) for _ in range(2)]
    executors[0].add_node(pub_node)
    executors[1].add_node(sub_node)
    stop = threading.Event()

    received: dict[int, float] = {}  # trajectory header stamp (ns) -> wall receive time (s)
    timing: dict[int, dict] = {}
    total = args.steps + args.warmup
    enough = threading.Event()

    def on_trajectory(raw: bytes) -> None:
        # the receiver stands in for the C++ trajectory controller: serialized bytes, only the header stamp
        # read (rclpy's Python deserialization of a 16-point trajectory would add its own time)
        t = time.time()
        received[trajectory_stamp_ns(raw)] = t
        if len(received) >= total:
            enough.set()

    def on_timing(msg) -> None:
        row = dict(zip(TIMING_FIELDS, msg.data))
        timing[int(round(row["stamp"] * 1e9))] = row

    sub_node.create_subscription(JointTrajectory, "/arm_controller/joint_trajectory", on_trajectory, 100, raw=True)
    sub_node.create_subscription(Float64MultiArray, "/policy_node/step_timing", on_timing, 100)
    image_pub = pub_node.create_publisher(Image, calib.cameras[camera].topic, make_qos(args.reliability, 5))
    joint_pub = pub_node.create_publisher(JointState, "/joint_states", make_qos("reliable", 10))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (args.height, args.width, 3), dtype=np.uint8) for _ in range(4)]
    mid = (calib.lower + calib.upper) / 2
    published: list[int] = []  # header stamps, in order
    publish_start: dict[int, int] = {}  # header stamp -> wall ns just before publish() (where e2e starts)
    publish_call: dict[int, float] = {}  # header stamp -> ms spent in publish() (part of the image hop)
    sending = threading.Event()
    period_ns = int(1e9 / args.rate)

    # frames serialized once; the next frame's bytes (its header stamp = its scheduled time) are made right
    # after each publish, off the measured path, as a C++ camera driver fills its message before publishing
    # (rclpy's conversion of a Python Image costs ~0.5 ms and a 900 KB bytes() copy ~0.4 ms here: the
    # driver's work, not the node's)
    images = [bytearray(serialize_message(ros_convert.rgb_to_image(f, 0, args.encoding))) for f in frames]

    def frame_bytes(k: int, stamp: int) -> bytes:
        buf = images[k % len(images)]
        struct.pack_into("<iI" if buf[1] == 1 else ">iI", buf, 4, stamp // 1_000_000_000, stamp % 1_000_000_000)
        return bytes(buf)

    ready: list = []  # [(header stamp, bytes)] of the next frame

    def on_image_timer() -> None:
        if not sending.is_set():
            ready.clear()
            return
        now = time.time_ns()
        if not ready or abs(ready[0][0] - now) > period_ns // 2:  # first frame, or the timer slipped: rebuild
            ready[:] = [(now, frame_bytes(len(published), now))]
        stamp, data = ready[0]
        t0 = time.time_ns()
        image_pub.publish(data)
        publish_call[stamp] = (time.time_ns() - t0) * 1e-6
        publish_start[stamp] = t0
        published.append(stamp)
        ready[:] = [(stamp + period_ns, frame_bytes(len(published), stamp + period_ns))]

    def on_joint_timer() -> None:
        joint_pub.publish(ros_convert.joint_state(calib.joint_names, mid, time.time_ns()))

    pub_node.create_timer(1.0 / args.rate, on_image_timer)
    pub_node.create_timer(0.01, on_joint_timer)
    threads = [threading.Thread(target=lambda ex=ex: [ex.spin_once(timeout_sec=0.05) for _ in iter(stop.is_set, True)],
                                daemon=True) for ex in executors]
    for th in threads:
        th.start()
    try:
        client = sub_node.create_client(SetBool, "/policy_node/enable")
        end = time.monotonic() + 60
        while not client.service_is_ready():
            if proc.poll() is not None:
                raise VqbetError(f"policy_node exited with {proc.returncode} (log: {proc.log_path})")
            if time.monotonic() > end:
                raise VqbetError("policy_node did not come up within 60 s")
            time.sleep(0.1)
        time.sleep(1.0)  # discovery of the image / trajectory endpoints
        budget = args.timeout or 3 * total / args.rate + 60
        sending.set()
        end = time.monotonic() + budget
        # wait cheaply (the GIL is shared with the receiving callback, whose clock reading is the figure);
        # frames that got no trajectory are made up for by a few more frames
        while time.monotonic() < end and not enough.wait(0.5):
            if proc.poll() is not None:
                raise VqbetError(f"policy_node exited with {proc.returncode} (log: {proc.log_path})")
        while time.monotonic() < end and len(_match(published[args.warmup:], received)) < args.steps:
            enough.wait(1.0 / args.rate)
        sending.clear()
        time.sleep(0.5)  # in-flight trajectories and timings
    finally:
        stop.set()
        for th in threads:
            th.join(5)
        for ex in executors:
            ex.shutdown()
        pub_node.destroy_node()
        sub_node.destroy_node()
        rclpy.shutdown(context=context)

    # header stamps travel as float seconds inside the node (~0.24 us resolution at today's epoch): match within 2 us
    got = _match(published, received)
    tim = _match(published, timing)
    measured = [s for s in published[args.warmup:] if s in got and s in tim][: args.steps]
    received = {s: received[got[s]] for s in measured}
    timing = {s: timing[tim[s]] for s in measured}
    if not measured:
        raise VqbetError("no trajectory came back for any published image (QoS mismatch? see --reliability)")
    start = {s: publish_start[s] * 1e-9 for s in measured}
    e2e = np.array([(received[s] - start[s]) * 1e3 for s in measured])
    runtime = np.array([timing[s]["runtime_ms"] for s in measured])
    node = np.array([timing[s]["node_ms"] for s in measured])
    window = published[args.warmup: args.warmup + len(measured)]
    return {
        "bench": "ros", "model": str(spec.path), "image": f"{args.width}x{args.height} {args.encoding}",
        "model_input": f"{spec.preprocess[spec.image_keys[0]].size[0]}x{spec.preprocess[spec.image_keys[0]].size[1]}",
        "rate_hz": args.rate, "steps": int(len(measured)), "frames_without_trajectory": int(sum(s not in got for s in window)),
        "e2e_ms": _stats(e2e), "runtime_step_ms": _stats(runtime), "ros_overhead_ms": _stats(e2e - runtime),
        "in_node_overhead_ms": _stats(node - runtime), "transport_ms": _stats(e2e - node),
        "image_hop_ms": _stats([(timing[s]["receive_time"] - start[s]) * 1e3 for s in measured]),
        "image_publish_call_ms": _stats([publish_call[s] for s in measured]),
        "trajectory_hop_ms": _stats([(received[s] - timing[s]["receive_time"]) * 1e3 - timing[s]["node_ms"] for s in measured]),
        "in_node_convert_ms": _stats([timing[s]["convert_ms"] for s in measured]),
        "in_node_safety_publish_ms": _stats([timing[s]["publish_ms"] for s in measured]),
        "runtime_stages_p50_ms": {k: round(float(np.median([timing[s][f"{k}_ms"] for s in measured])), 3)
                                  for k in ("preprocess", "encoder", "policy", "sample_decode")},
    }


if __name__ == "__main__":
    sys.exit(main())
