"""Shared pieces of the recorder ROS tests: private DDS domain, child processes, a service client,
and the expected dataset computed from the fake publisher's message log."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
JOINTS = ["j_a", "j_b", "j_c"]
CALIBRATION = """\
robot: testbot
control_hz: 20
joint_names: [j_a, j_b, j_c]
joint_limits: {lower: -10, upper: 10, velocity: 1}
cameras:
  front: {topic: /camera/image_raw, size: [32, 24], crop: [8, 0, 48, 48]}
  wrist: {topic: /wrist/image/compressed, compressed: true, size: [32, 24]}
"""
CAMERAS = {"front": ("/camera/image_raw", "bgr8", 64, 48), "wrist": ("/wrist/image/compressed", "png", 64, 48)}


def ros_env() -> dict:
    """Environment of a test's processes: a private domain, discovery on this machine only."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(100 + random.randrange(100))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_calibration(tmp: Path) -> Path:
    path = tmp / "cal.yaml"
    path.write_text(CALIBRATION)
    return path


class Procs:
    """Child processes of one test; :meth:`close` stops every one of them (SIGINT, then SIGKILL)."""

    def __init__(self, env: dict, logdir: Path):
        self.env, self.logdir, self.procs = env, logdir, []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(self.logdir), start_new_session=True)
        proc.log_path = self.logdir / f"{name}.log"
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def kill(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.stop(proc, timeout=5)


def fake_streams_args(log: Path, joint_hz: float = 200, extra: list[str] = ()) -> list[str]:
    args = ["-m", "vqbet_ros.fake_streams", "--joints", ",".join(JOINTS), "--joint-hz", str(joint_hz),
            "--shuffle", "--log", str(log), "--depth", "2000"]  # deep history: a stalled reader loses nothing
    for name, (topic, enc, w, h) in CAMERAS.items():
        args += ["--camera", f"{name}:{topic}:{enc}:{w}x{h}"]
    return args + list(extra)


def recorder_args(output: Path, calibration: Path, params: dict | None = None, params_file: Path | None = None) -> list[str]:
    args = ["-m", "vqbet_ros.recorder_node", "--ros-args"]
    if params_file is not None:
        args += ["--params-file", str(params_file)]
    base = {"output": str(output), "calibration": str(calibration), "min_free_mb": 1.0, "stop_free_mb": 0.5,
            "image_qos.reliability": "reliable", "status_period": 0.2}
    for key, value in {**base, **(params or {})}.items():
        args += ["-p", f"{key}:={value}"]
    return args


class Client:
    """The test's own ROS node: calls the recorder's services, listens to its status and events."""

    def __init__(self, domain_id: int, recorder: str = "/recorder_node", raw_topics: dict | None = None):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String
        from std_srvs.srv import Trigger
        from diagnostic_msgs.msg import DiagnosticArray

        self.rclpy = rclpy
        self.Trigger = Trigger
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("recorder_test_client", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.clients = {n: self.node.create_client(Trigger, f"{recorder}/{n}")
                        for n in ("start_episode", "end_episode", "discard_episode")}
        self.status: list[dict] = []
        self.events: list[dict] = []
        self.diagnostics: list = []
        self.raw: list[tuple[str, int, bytes]] = []  # (topic, receive ns, serialized bytes) for bag writing
        self.node.create_subscription(String, f"{recorder}/status", lambda m: self.status.append(json.loads(m.data)), 10)
        events_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(String, f"{recorder}/episode_events",
                                      lambda m: self.events.append(json.loads(m.data)), events_qos)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.task_pub = self.node.create_publisher(String, f"{recorder}/task", 10)
        for topic, msg_type in (raw_topics or {}).items():
            # a loaded test machine can stall this process for a second: keep enough history
            qos = events_qos if topic.endswith("episode_events") else 2000
            self.node.create_subscription(msg_type, topic, self._raw_callback(topic), qos, raw=True)

    def _raw_callback(self, topic):
        def callback(data: bytes) -> None:
            self.raw.append((topic, self.node.get_clock().now().nanoseconds, bytes(data)))

        return callback

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.05, max(0.0, end - time.monotonic())))

    def wait_ready(self, timeout: float = 30.0, proc=None) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(c.service_is_ready() for c in self.clients.values()):
                return
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"recorder exited with {proc.returncode}: {proc.log_path.read_text()[-2000:]}")
            self.spin(0.1)
        raise AssertionError("recorder services did not appear")

    def call_async(self, name: str):
        return self.clients[name].call_async(self.Trigger.Request())

    def call(self, name: str, timeout: float = 15.0):
        future = self.call_async(name)
        end = time.monotonic() + timeout
        while not future.done() and time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.05)
        if not future.done():
            raise AssertionError(f"{name}: no answer within {timeout} s")
        return future.result()

    def set_task(self, label: str) -> None:
        from std_msgs.msg import String

        self.task_pub.publish(String(data=label))

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.context)


# ---------------------------------------------------------------------- expectations
def read_pub_log(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """stream -> (seq, stamp ns) of the good messages the fake publisher sent, in stamp order."""
    rows: dict[str, list] = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the publisher's exit
        if not rec["bad"]:
            rows.setdefault(rec["s"], []).append((rec["k"], rec["t"]))
    out = {}
    for stream, items in rows.items():
        arr = np.array(sorted(items, key=lambda r: r[1]), dtype=np.int64)
        out[stream] = (arr[:, 0], arr[:, 1])
    return out


def tick_ns(timestamps: np.ndarray, control_hz: float) -> np.ndarray:
    """Exact tick times: ticks lie on the k * period ns grid, float64 seconds are within a microsecond."""
    period = int(round(1e9 / control_hz))
    return np.round(np.asarray(timestamps, dtype=np.float64) * (1e9 / period)).astype(np.int64) * period


def get_parameters(client: Client, node: str, names: list[str], timeout: float = 10.0) -> dict:
    """Read parameters of a running node through its get_parameters service."""
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import parameter_value_to_python

    cli = client.node.create_client(GetParameters, f"{node}/get_parameters")
    assert cli.wait_for_service(timeout_sec=timeout), f"{node}/get_parameters not available"
    future = cli.call_async(GetParameters.Request(names=names))
    end = time.monotonic() + timeout
    while not future.done() and time.monotonic() < end:
        client.executor.spin_once(timeout_sec=0.05)
    assert future.done(), "get_parameters: no answer"
    return {n: parameter_value_to_python(v) for n, v in zip(names, future.result().values)}


BAG_TYPES = {
    "/camera/image_raw": "sensor_msgs/msg/Image",
    "/wrist/image/compressed": "sensor_msgs/msg/CompressedImage",
    "/joint_states": "sensor_msgs/msg/JointState",
    "/teleop/joint_command": "sensor_msgs/msg/JointState",
}


def write_bag(path: Path, raw: list[tuple[str, int, bytes]], types: dict, storage: str) -> Path:
    """What ``ros2 bag record`` would have written: the serialized messages at their receive times."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    typestore = get_typestore(Stores.ROS2_JAZZY)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {t: writer.add_connection(t, msgtype, typestore=typestore) for t, msgtype in types.items()}
        for topic, stamp, data in sorted(raw, key=lambda r: r[1]):
            writer.write(conns[topic], stamp, data)
    return path


def _value(stream: str, seq: int, preprocess: dict) -> np.ndarray:
    from vqbet_ros.fake_streams import command_values, frame, joint_values

    if stream == "robot_joint":
        return joint_values(seq, len(JOINTS))
    if stream == "action":
        return command_values(seq, len(JOINTS))
    name = stream[len("camera_"):]
    _, _, w, h = CAMERAS[name]
    return preprocess[name].crop_resize(frame(seq, w, h))


def check_episode(pub: dict, episode: dict, preprocess: dict, control_hz: float, max_age: float,
                  exact: bool, where: str = "") -> None:
    """Every stored row is a good published message at most ``max_age`` old at its tick, in publish order;
    ``exact``: it is the latest one published at or before the tick (no message arrived too late)."""
    ticks = tick_ns(episode["timestamp"], control_hz)
    age = int(round(max_age * 1e9))
    for stream, (seqs, stamps) in pub.items():
        chosen = []
        for row, tick in enumerate(ticks):
            hi = int(np.searchsorted(stamps, tick, side="right"))
            lo = int(np.searchsorted(stamps, tick - age, side="left"))
            candidates = range(hi - 1, lo - 1, -1) if not exact else [hi - 1]
            got = episode[stream][row]
            match = next((int(seqs[j]) for j in candidates if j >= 0 and np.array_equal(got, _value(stream, int(seqs[j]), preprocess))), None)
            assert match is not None, (f"{where} {stream} row {row}: not the {'latest' if exact else 'a'} "
                                       f"message published within {max_age} s before the tick")
            chosen.append(match)
        assert np.all(np.diff(chosen) >= 0), f"{where} {stream}: messages out of order {chosen}"


def set_parameters(client: Client, node: str, values: dict, timeout: float = 10.0) -> None:
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    cli = client.node.create_client(SetParameters, f"{node}/set_parameters")
    assert cli.wait_for_service(timeout_sec=timeout), f"{node}/set_parameters not available"
    req = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
    future = cli.call_async(req)
    end = time.monotonic() + timeout
    while not future.done() and time.monotonic() < end:
        client.executor.spin_once(timeout_sec=0.05)
    assert future.done() and all(r.successful for r in future.result().results), f"set_parameters {values} failed"
