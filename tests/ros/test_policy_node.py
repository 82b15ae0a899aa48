"""policy_node over real DDS (loopback, private domain) with a small exported image model.

One node process (module fixture) runs in a namespace with the shipped config/policy.yaml, while this
test process publishes synthetic camera and joint-state streams and records what comes back. The
scenario drives it through: disabled at start, enable, malformed messages, a camera stall and its
recovery, the task sequence (service and topic), a parameter change, disable, and SIGINT. The tests
then check each phase. The model is trained for a few steps on a tiny synthetic dataset and exported
with ``vqbet export`` once per test session.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy")

from vqbet_core.calibration import load_calibration  # noqa: E402
from vqbet_core.data.store import ZarrDataset  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[2]
SHIPPED_YAML = REPO / "ros2_ws/src/vqbet_bringup/config/policy.yaml"
NS = "/robot1"
NODE = f"{NS}/policy_node"
GOALS = {"slide_cabinet": [1.0, 0.0], "microwave": [0.0, 1.0]}
IMAGE_W, IMAGE_H = 64, 48  # what the test camera publishes; the model sees 32x24
PERIOD = 0.1  # the model's control rate is the calibration's 10 Hz
MAX_AGE = 0.3  # from the shipped YAML (the code default is 0.5: proves the YAML applied)
VELOCITY_SCALE = 0.1


# ---------------------------------------------------------------------- the model
def _calibration(path: Path, joint1=None, compressed_topic=None) -> Path:
    raw = yaml.safe_load((REPO / "calibration/franka_sim.yaml").read_text())
    raw["control_hz"] = 1.0 / PERIOD  # the tests' timing figures; the shipped file is the kitchen's 12.5 Hz
    raw["cameras"]["front"]["size"] = [32, 24]
    if compressed_topic:
        raw["cameras"]["front"].update(topic=compressed_topic, compressed=True)
    if joint1 is not None:
        raw["joint_limits"]["lower"][0], raw["joint_limits"]["upper"][0] = joint1
    path.write_text(yaml.safe_dump(raw))
    return path


def build_tiny_model(tmp: Path) -> Path:
    """Synthetic zarr (9 Franka joints, 32x24 camera, two goals) -> a few training steps -> vqbet export."""
    import torch

    from vqbet_core.cli.main import main as vqbet

    torch.set_num_threads(2)
    calib = load_calibration(_calibration(tmp / "calib_train.yaml"))
    ds = ZarrDataset.create(tmp / "tiny.zarr", {**calib.to_attrs(), "goal_vectors": GOALS, "source": "test"})
    rng = np.random.default_rng(0)
    mid = (calib.lower + calib.upper) / 2
    for e in range(6):
        goal = np.array(GOALS["slide_cabinet" if e % 2 else "microwave"], np.float32)
        q = (mid + rng.normal(0, 0.05, mid.size)).astype(np.float32)
        qs, acts = [], []
        for _ in range(16):
            a = (q + (0.01 if e % 2 else -0.01)).astype(np.float32)
            qs.append(q.copy())
            acts.append(a)
            q = a
        ds.add_episode({"robot_joint": np.stack(qs), "action": np.stack(acts),
                        "camera_front": rng.integers(0, 255, (16, 24, 32, 3), dtype=np.uint8),
                        "goal": np.tile(goal, (16, 1)), "timestamp": np.arange(16) / 10.0})
    cfg = {"name": "tiny", "policy": "vqbet",
           "data": {"obs_keys": ["robot_joint"], "image_keys": ["camera_front"], "goal_key": "goal", "val_fraction": 0.0},
           "vision": {"weights": "none", "image_size": [32, 24]}, "obs_window": 3, "action_chunk": 4,
           "vq": {"n_codes": 4, "code_dim": 16, "hidden": 32}, "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 32},
           "heads": {"hidden": 32},
           "train": {"phase1_steps": 10, "phase2_steps": 4, "batch_size": 16, "phase1_batch_size": 32, "log_every": 5,
                     "val_every": 100, "ckpt_every": 100, "device": "cpu"}}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert vqbet(["train", "--config", str(tmp / "tiny.yaml"), "--data", str(tmp / "tiny.zarr"), "--out", str(tmp / "run"),
                  "--no-progress"]) == 0
    assert vqbet(["export", "--checkpoint", str(tmp / "run"), "--out", str(tmp / "model"), "--parity-steps", "2"]) == 0
    return tmp / "model"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("policy_model"))


# ---------------------------------------------------------------------- the test's own ROS node
def ros_env() -> dict:
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(100 + random.randrange(100))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Peer:
    """Publishes camera + joint streams from a background executor and records trajectories / diagnostics."""

    def __init__(self, domain_id: int, joint_names: list[str], joints: np.ndarray):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import Empty
        from trajectory_msgs.msg import JointTrajectory

        from vqbet_ros import ros_convert

        self.rclpy, self.ros_convert = rclpy, ros_convert
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("policy_test_peer", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.joint_names, self.joints = list(joint_names), np.asarray(joints, np.float64)
        self.camera_on = True
        self.joints_on = True
        self.offset_ns = {"camera": 0, "joints": 0}  # added to the stamps: the sender's clock minus ours
        self.sent_offset = {"camera": 0, "joints": 0}  # messages published with a non-zero offset
        self.trajectories: list[tuple[float, object]] = []  # (wall receive time, msg)
        self.diagnostics: list[dict] = []
        self.image_pub = self.node.create_publisher(Image, "/camera/image_raw", 10)
        self.joint_pub = self.node.create_publisher(JointState, "/joint_states", 10)
        self.goal_reached_pub = self.node.create_publisher(Empty, f"{NODE}/goal_reached", 10)
        self.node.create_subscription(JointTrajectory, "/arm_controller/joint_trajectory",
                                      lambda m: self.trajectories.append((time.time(), m)), 50)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)
        self.rgb = np.random.default_rng(1).integers(0, 255, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8)
        self.node.create_timer(1 / 30, self._publish_image)
        self.node.create_timer(1 / 100, self._publish_joints)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set():
            self.executor.spin_once(timeout_sec=0.02)

    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def _publish_image(self) -> None:
        if self.camera_on:
            offset = self.offset_ns["camera"]
            self.sent_offset["camera"] += offset != 0
            self.image_pub.publish(self.ros_convert.rgb_to_image(self.rgb, self.now_ns() + offset, "bgr8"))

    def _publish_joints(self) -> None:
        if self.joints_on:
            offset = self.offset_ns["joints"]
            self.sent_offset["joints"] += offset != 0
            self.joint_pub.publish(self.ros_convert.joint_state(self.joint_names, self.joints, self.now_ns() + offset))

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name.startswith("policy_node"):
                self.diagnostics.append({"_level": int.from_bytes(status.level, "little") if isinstance(status.level, bytes)
                                         else int(status.level), "_message": status.message, "_time": time.time(),
                                         **{kv.key: kv.value for kv in status.values}})

    def call(self, srv_type, name: str, request, timeout: float = 15.0):
        client = self.node.create_client(srv_type, name)
        assert client.wait_for_service(timeout_sec=timeout), f"{name} not available"
        future = client.call_async(request)
        end = time.monotonic() + timeout
        while not future.done() and time.monotonic() < end:
            time.sleep(0.01)
        assert future.done(), f"{name}: no answer within {timeout} s"
        self.node.destroy_client(client)
        return future.result()

    def enable(self, on: bool):
        from std_srvs.srv import SetBool

        return self.call(SetBool, f"{NODE}/enable", SetBool.Request(data=on))

    def next_goal(self):
        from std_srvs.srv import Trigger

        return self.call(Trigger, f"{NODE}/next_goal", Trigger.Request())

    def get_parameters(self, names: list[str]) -> dict:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        result = self.call(GetParameters, f"{NODE}/get_parameters", GetParameters.Request(names=names))
        return {n: parameter_value_to_python(v) for n, v in zip(names, result.values)}

    def set_parameter(self, name: str, value):
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        result = self.call(SetParameters, f"{NODE}/set_parameters",
                           SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()]))
        return result.results[0]

    def wait_for(self, predicate, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def publish_bad_messages(self) -> dict:
        """Malformed images and joint states, interleaved with the good streams; returns how many of each."""
        from sensor_msgs.msg import JointState

        counts = {"camera_front": 0, "joint_states": 0}
        for i in range(3):
            img = self.ros_convert.rgb_to_image(self.rgb, self.now_ns(), "bgr8")
            img.encoding = "32FC1"  # unsupported encoding
            self.image_pub.publish(img)
            img = self.ros_convert.rgb_to_image(self.rgb, self.now_ns(), "bgr8")
            img.data = bytes(img.data)[: len(img.data) // 2]  # truncated
            self.image_pub.publish(img)
            img = self.ros_convert.rgb_to_image(self.rgb, self.now_ns(), "bgr8")
            img.width = 4 * IMAGE_W  # size that contradicts the data
            self.image_pub.publish(img)
            counts["camera_front"] += 3
            bad = self.ros_convert.joint_state(self.joint_names, self.joints, self.now_ns())
            bad.position = list(bad.position[:-2])  # arrays of different lengths
            self.joint_pub.publish(bad)
            nan = self.ros_convert.joint_state(self.joint_names, self.joints, self.now_ns())
            nan.position = [float("nan")] + list(nan.position[1:])
            self.joint_pub.publish(nan)
            dup = JointState(name=self.joint_names[:2] + self.joint_names[:1], position=[0.0, 0.0, 0.0])
            dup.header.stamp = self.ros_convert.ns_to_time(self.now_ns())
            self.joint_pub.publish(dup)
            counts["joint_states"] += 3
            time.sleep(0.15)
        return counts

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.context)


def is_hold(msg) -> bool:
    return len(msg.points) == 1 and all(v == 0.0 for v in msg.points[0].velocities)


def between(peer: Peer, t0: float, t1: float) -> list:
    return [(t, m) for t, m in peer.trajectories if t0 <= t < t1]


# ---------------------------------------------------------------------- the scenario
@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("policy_node")
    train_cal = load_calibration(_calibration(tmp / "train_cal.yaml"))
    mid = (train_cal.lower + train_cal.upper) / 2
    # the node's calibration narrows panda_joint1 well below the data's range, so clamping must happen
    node_cal_path = _calibration(tmp / "node_cal.yaml", joint1=(float(mid[0] - 0.7), float(mid[0] - 0.6)))
    node_cal = load_calibration(node_cal_path)
    joints = mid.copy()
    joints[0] = node_cal.upper[0]
    env = ros_env()
    log_path = tmp / "policy_node.log"
    args = [sys.executable, "-m", "vqbet_ros.policy_node", "--ros-args", "-r", f"__ns:={NS}",
            "--params-file", str(SHIPPED_YAML), "-p", f"model:={tiny_model}", "-p", f"calibration:={node_cal_path}",
            "-p", "task_sequence:=[microwave, slide_cabinet]", "-p", f"velocity_scale:={VELOCITY_SCALE}",
            "-p", "diagnostics_period:=0.25", "-p", "threads:=1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    peer = None
    r = {"cal": node_cal, "joints": joints, "log": log_path, "marks": {}, "responses": {}}
    try:
        peer = Peer(int(env["ROS_DOMAIN_ID"]), node_cal.joint_names, joints)
        r["peer"] = peer
        m, resp = r["marks"], r["responses"]
        try:
            r["params"] = peer.get_parameters(list(_shipped_parameters()) + ["velocity_scale", "model"])
        except AssertionError:
            raise AssertionError(f"policy_node did not come up: {log_path.read_text()[-3000:]}") from None
        m["disabled"] = time.time()
        time.sleep(1.0)
        m["enable"] = time.time()
        resp["enable"] = peer.enable(True)
        time.sleep(1.5)
        m["bad"] = time.time()
        r["bad_sent"] = peer.publish_bad_messages()
        time.sleep(0.6)
        m["stall"] = time.time()
        peer.camera_on = False
        time.sleep(1.2)
        r["diag_stalled"] = dict(peer.diagnostics[-1])
        m["resume"] = time.time()
        peer.camera_on = True
        time.sleep(1.2)
        m["next_goal"] = time.time()
        resp["next_goal"] = peer.next_goal()
        time.sleep(0.6)
        r["diag_goal2"] = dict(peer.diagnostics[-1])
        m["goal_reached"] = time.time()
        from std_msgs.msg import Empty

        peer.goal_reached_pub.publish(Empty())
        time.sleep(0.8)
        resp["enable_after_done"] = peer.enable(True)
        resp["set_sequence"] = peer.set_parameter("task_sequence", ["slide_cabinet"])
        resp["set_bad_sequence"] = peer.set_parameter("task_sequence", ["no_such_goal"])
        resp["set_read_only"] = peer.set_parameter("max_age", 5.0)
        m["reenable"] = time.time()
        resp["reenable"] = peer.enable(True)
        time.sleep(1.0)
        m["disable"] = time.time()
        resp["disable"] = peer.enable(False)
        time.sleep(0.8)
        m["end"] = time.time()
        r["diag_end"] = dict(peer.diagnostics[-1])
        proc.send_signal(signal.SIGINT)
        r["returncode"] = proc.wait(15)
        yield r
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if peer is not None:
            peer.close()


def _shipped_parameters() -> dict:
    """The shipped YAML's parameters, flattened (``image_qos: {depth: 5}`` -> ``image_qos.depth``)."""
    raw = yaml.safe_load(SHIPPED_YAML.read_text())
    assert list(raw) == ["/**/policy_node"], "keys must sit under /**/policy_node (a bare node name is ignored in a namespace)"

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    return dict(flat(raw["/**/policy_node"]["ros__parameters"]))


# ---------------------------------------------------------------------- checks
def test_shipped_parameter_file_applies_in_a_namespace(run):
    shipped = _shipped_parameters()
    overridden = {"model", "calibration", "task_sequence", "velocity_scale", "diagnostics_period", "threads"}
    for name, value in shipped.items():
        if name not in overridden:
            assert run["params"][name] == value, f"{name}: node has {run['params'][name]!r}, file says {value!r}"
    assert run["params"]["max_age"] == MAX_AGE  # the code default is 0.5: the file really applied
    assert run["params"]["velocity_scale"] == VELOCITY_SCALE  # -p after --params-file wins


def test_disabled_at_start_publishes_nothing(run):
    m = run["marks"]
    assert between(run["peer"], 0, m["enable"]) == []
    assert any(d["enabled"] == "False" for d in run["peer"].diagnostics if d["_time"] < m["enable"])


def test_enabled_trajectories_are_whole_safe_chunks(run):
    peer, m, cal = run["peer"], run["marks"], run["cal"]
    assert run["responses"]["enable"].success, run["responses"]["enable"].message
    got = [msg for _, msg in between(peer, m["enable"], m["bad"])]
    assert len(got) >= 8, f"{len(got)} trajectories in 1.5 s at 10 Hz"
    stamps = []
    vmax = cal.max_velocity * VELOCITY_SCALE
    previous = None  # (absolute point times, positions) of the trajectory before
    for msg in got:
        assert list(msg.joint_names) == cal.joint_names
        assert 1 <= len(msg.points) <= 4
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        stamps.append(stamp)
        tfs = np.array([p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points])
        np.testing.assert_allclose(np.diff(tfs), PERIOD, atol=1e-6)
        assert tfs[0] > 0 and tfs[-1] == pytest.approx(0.4, abs=1e-6)  # action k is due at stamp + (k + 1) period
        pos = np.array([list(p.positions) for p in msg.points])
        vel = np.array([list(p.velocities) for p in msg.points])
        assert np.all(pos >= cal.lower - 1e-9) and np.all(pos <= cal.upper + 1e-9)
        # per-step velocity bound of the command: the first trajectory from the measured joints, each later one
        # from where the one before commands at this stamp (it is sent at or after it), through every point
        start = run["joints"] if previous is None else np.array(
            [np.interp(stamp, previous[0], previous[1][:, j]) for j in range(pos.shape[1])])
        p = np.vstack([start[None], pos])
        t = np.concatenate([[0.0], tfs])
        assert np.all(np.abs(np.diff(p, axis=0)) <= vmax * np.diff(t)[:, None] + 1e-9)
        previous = (stamp + tfs, pos)
        assert np.all(np.abs(vel) <= vmax + 1e-9) and np.all(vel[-1] == 0)
    assert sum(len(msg.points) == 4 for msg in got) >= 0.8 * len(got)  # points are dropped only when a step is late
    gaps = np.diff(stamps)
    assert np.all(gaps > 0) and np.median(gaps) == pytest.approx(PERIOD, abs=0.02)
    diag = run["diag_end"]
    assert int(diag["clamped_values"]) > 0 and int(diag["rate_limited_values"]) > 0


def test_malformed_messages_are_counted_and_survived(run):
    peer, m = run["peer"], run["marks"]
    during = [msg for _, msg in between(peer, m["bad"], m["stall"])]
    assert len(during) >= 6, "the node stopped commanding while bad messages arrived"
    diag = run["diag_stalled"]
    assert int(diag["bad_camera_front"]) == run["bad_sent"]["camera_front"]
    assert int(diag["bad_joint_states"]) == run["bad_sent"]["joint_states"]
    assert "joint" in diag["last_bad_message"] or "camera" in diag["last_bad_message"]
    assert int(diag["internal_errors"]) == 0
    assert run["returncode"] == 0


def test_camera_stall_stops_commands_within_one_period_plus_max_age(run):
    peer, m = run["peer"], run["marks"]
    after = between(peer, m["stall"], m["resume"])
    regular = [t for t, msg in after if not is_hold(msg)]
    holds = [t for t, msg in after if is_hold(msg)]
    slack = 0.1  # DDS delivery and scheduling on a loaded 2-core machine
    assert all(t <= m["stall"] + MAX_AGE + PERIOD + slack for t in regular), [t - m["stall"] for t in regular]
    assert len(holds) == 1 and holds[0] <= m["stall"] + MAX_AGE + PERIOD + slack
    assert all(t < holds[0] for t in regular)  # the hold is the last word
    diag = run["diag_stalled"]
    assert diag["commanding"] == "False" and "camera front" in diag["state"] and diag["_level"] == 1
    assert int(diag["skipped_steps"]) >= 5 and int(diag["stops"]) == 1 and int(diag["holds"]) == 1
    assert float(diag["age_camera_front_s"]) > MAX_AGE and float(diag["rate_camera_front_hz"]) == 0.0
    # camera back: commanding resumes, with a fresh history
    resumed = [msg for _, msg in between(peer, m["resume"], m["next_goal"]) if not is_hold(msg)]
    assert len(resumed) >= 5
    assert run["log"].read_text().count("new episode: history cleared") >= 3
    assert "ready: disabled: call ~/enable" in run["log"].read_text()  # said once spinning, services up


def test_task_sequence_advances_by_service_and_topic(run):
    peer, m, resp = run["peer"], run["marks"], run["responses"]
    assert resp["next_goal"].success and resp["next_goal"].message == "goal 2/2: slide_cabinet"
    assert run["diag_goal2"]["goal"] == "slide_cabinet" and run["diag_goal2"]["goal_index"] == "1"
    assert len([1 for _, msg in between(peer, m["next_goal"], m["goal_reached"]) if not is_hold(msg)]) >= 3
    # ~/goal_reached on the last goal: sequence complete -> one hold, then silence, and enable is refused
    done = between(peer, m["goal_reached"], m["reenable"])
    assert len(done) >= 1 and is_hold(done[-1][1]) and all(t < m["goal_reached"] + 0.5 for t, _ in done)
    assert not resp["enable_after_done"].success and "complete" in resp["enable_after_done"].message
    # a new sequence (parameter) restarts it; unknown goal names are refused
    assert resp["set_sequence"].successful
    assert not resp["set_bad_sequence"].successful and "no_such_goal" in resp["set_bad_sequence"].reason
    assert not resp["set_read_only"].successful and "restart" in resp["set_read_only"].reason
    assert resp["reenable"].success and "slide_cabinet" in resp["reenable"].message


def test_disable_sends_one_hold_then_nothing(run):
    peer, m = run["peer"], run["marks"]
    assert len([1 for _, msg in between(peer, m["reenable"], m["disable"]) if not is_hold(msg)]) >= 5
    after = between(peer, m["disable"], m["end"])
    assert len(after) <= 2 and is_hold(after[-1][1])  # at most one chunk in flight, then the hold
    hold = after[-1][1]
    assert np.all(np.array(hold.points[0].positions) <= run["cal"].upper + 1e-9)
    assert run["diag_end"]["enabled"] == "False" and run["diag_end"]["commanding"] == "False"


def test_bad_model_folder_is_one_line_and_exit_2(tmp_path):
    env = ros_env()
    cal = _calibration(tmp_path / "cal.yaml")
    proc = subprocess.run([sys.executable, "-m", "vqbet_ros.policy_node", "--ros-args", "-p", f"model:={tmp_path / 'nope'}",
                           "-p", f"calibration:={cal}"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "model folder not found" in lines[0], proc.stderr


PIN_CPU = max(os.sched_getaffinity(0))


def _cpus_allowed(task: Path) -> str:
    return next(line.split(":", 1)[1].strip() for line in (task / "status").read_text().splitlines()
                if line.startswith("Cpus_allowed_list"))


def test_compressed_camera_trigger_mode_enabled_at_start_and_hold_on_sigint(tiny_model, tmp_path):
    """CompressedImage input, a step per frame stamped with the frame's stamp, enabled:=true, hold at shutdown;
    with ``executor:=single`` (the module fixture's node runs the default EventsExecutor), pinned by ``cpus``."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import CompressedImage, JointState
    from trajectory_msgs.msg import JointTrajectory

    from vqbet_ros import ros_convert

    cal_path = _calibration(tmp_path / "cal.yaml", compressed_topic="/cam/front/compressed")
    cal = load_calibration(cal_path)
    env = ros_env()
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vqbet_ros.policy_node", "--ros-args", "-p", f"model:={tiny_model}",
                                 "-p", f"calibration:={cal_path}", "-p", "enabled:=true", "-p", "trigger:=camera",
                                 "-p", "task_sequence:=[microwave]", "-p", "threads:=1", "-p", "diagnostics_period:=0.3",
                                 "-p", "executor:=single", "-p", f"cpus:={PIN_CPU}"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(env["ROS_DOMAIN_ID"]))
    node = rclpy.create_node("compressed_peer", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        got, diags = [], []
        node.create_subscription(JointTrajectory, "/arm_controller/joint_trajectory", got.append, 50)
        from diagnostic_msgs.msg import DiagnosticArray

        node.create_subscription(DiagnosticArray, "/diagnostics",
                                 lambda m: diags.extend({kv.key: kv.value for kv in s.values} for s in m.status), 50)
        img_pub = node.create_publisher(CompressedImage, "/cam/front/compressed", 10)
        js_pub = node.create_publisher(JointState, "/joint_states", 10)
        mid = (cal.lower + cal.upper) / 2
        rgb = np.random.default_rng(2).integers(0, 255, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8)
        sent, bad = [], 0

        def frame(garbage=False):
            stamp = node.get_clock().now().nanoseconds
            msg = ros_convert.rgb_to_compressed(rgb, stamp, "jpeg")
            if garbage:
                msg.data = b"not a jpeg"
            else:
                sent.append(stamp)
            img_pub.publish(msg)
            return int(garbage)

        def spin(seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                executor.spin_once(timeout_sec=0.01)

        node.create_timer(0.01, lambda: js_pub.publish(ros_convert.joint_state(cal.joint_names, mid,
                                                                                node.get_clock().now().nanoseconds)))
        end = time.monotonic() + 60
        while not got and time.monotonic() < end and proc.poll() is None:
            frame()
            spin(0.1)
        assert got, f"no trajectory: {log_path.read_text()[-2000:]}"
        allowed = {t.name: _cpus_allowed(t) for t in Path(f"/proc/{proc.pid}/task").iterdir()}
        assert len(allowed) > 3 and set(allowed.values()) == {str(PIN_CPU)}, allowed  # DDS + onnxruntime threads too
        got.clear()
        sent.clear()
        for i in range(25):  # one frame per control period: each one is a step
            bad += frame(garbage=i % 7 == 6)
            spin(0.1)
        end = time.monotonic() + 3
        while time.monotonic() < end and not (diags and int(diags[-1]["bad_camera_front"]) >= bad):
            frame()  # keep the camera fresh: the node must still be commanding at SIGINT
            spin(0.1)
        stamps = {m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec for m in got if len(m.points) > 1}
        matched = [s for s in sent if any(abs(s - t) <= 2000 for t in stamps)]
        assert len(matched) >= len(sent) - 2, f"{len(matched)} of {len(sent)} frames answered with their own stamp"
        assert diags and int(diags[-1]["bad_camera_front"]) == bad and bad >= 3
        frame()
        spin(0.05)
        n_before = len(got)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        spin(0.5)
        assert len(got) > n_before and is_hold(got[-1]), "no hold trajectory at shutdown while commanding"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


# ---------------------------------------------------------------------- clocks and corrupt frames (issue 24)
def _start_node(tiny_model, cal_path, env, log_path, *extra):
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "vqbet_ros.policy_node", "--ros-args", "-p", f"model:={tiny_model}",
                                 "-p", f"calibration:={cal_path}", "-p", "enabled:=true", "-p", "task_sequence:=[microwave]",
                                 "-p", "threads:=1", "-p", f"max_age:={MAX_AGE}", "-p", "diagnostics_period:=0.2", *extra],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _commanding_since(peer: Peer, t0: float) -> bool:
    return any(not is_hold(msg) for _, msg in between(peer, t0, float("inf")))


@pytest.mark.parametrize("tolerance", [None, 10.0], ids=["refused", "tolerance_10s"])
def test_clock_offset_never_extends_the_stale_input_stop(tiny_model, tmp_path, tolerance):
    """Issue 24.1: an input stamped 5 s ahead of (or behind) the node's clock for half a second, then silent.

    Before: stamps 5 s ahead made the age negative and the node kept commanding for 5.3 s (max_age 0.3 s).
    Now: stamps beyond future_tolerance are refused (counted), ages are max(now - stamp, now - receive), so
    the hold comes within max_age + one control period of the first offset message, for each input and
    both directions; the offset is reported in /diagnostics (clock_offset_<stream>_s). With a tolerance
    above the offset (10 s) the stamps are used, and the age rule alone still holds within max_age + one
    period of the stream's end."""
    cal_path = _calibration(tmp_path / "cal.yaml")
    cal = load_calibration(cal_path)
    env = ros_env()
    log_path = tmp_path / "node.log"
    proc = _start_node(tiny_model, cal_path, env, log_path,
                       *([] if tolerance is None else ["-p", f"future_tolerance:={tolerance}"]))
    peer = Peer(int(env["ROS_DOMAIN_ID"]), cal.joint_names, (cal.lower + cal.upper) / 2)
    slack = 0.15  # DDS delivery and scheduling on a loaded 2-core machine
    results = {}
    try:
        t0 = time.time()
        peer.wait_for(lambda: _commanding_since(peer, t0) or proc.poll() is not None, 90, "commanding at start")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        for stream, key in (("camera", "camera_front"), ("joints", "joint_states")):
            for offset in (5.0, -5.0):
                t_ready = time.time()
                peer.wait_for(lambda: _commanding_since(peer, t_ready + 0.2), 20, f"commanding before {stream} {offset:+}")
                sent_before = peer.sent_offset[stream]
                t_off = time.time()
                peer.offset_ns[stream] = int(offset * 1e9)
                time.sleep(0.5)
                t_stop = time.time()
                if stream == "camera":
                    peer.camera_on = False
                else:
                    peer.joints_on = False
                n_offset = peer.sent_offset[stream] - sent_before
                time.sleep(MAX_AGE + 1.2)
                t_end = time.time()
                after = between(peer, t_off, t_end)
                diags = [d for d in peer.diagnostics if t_off + 0.1 < d["_time"] <= t_end]
                results[stream, offset] = dict(
                    regular=[t - t_off for t, msg in after if not is_hold(msg)],
                    holds=[t - t_off for t, msg in after if is_hold(msg)], stop=t_stop - t_off, n_offset=n_offset,
                    offsets=[float(d.get(f"clock_offset_{key}_s", "nan")) for d in diags],
                    states=[d["state"] for d in diags], last=dict(diags[-1]))
                peer.offset_ns[stream] = 0
                peer.camera_on = peer.joints_on = True
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        peer.close()
    bound = MAX_AGE + PERIOD + slack
    for (stream, offset), r in results.items():
        what = f"{stream} {offset:+} s: {r}"
        assert len(r["holds"]) == 1 and all(t < r["holds"][0] for t in r["regular"]), what  # one hold, then silence
        assert any(abs(o - offset) < 0.25 for o in r["offsets"]), what  # the offset is visible in /diagnostics
        if tolerance is not None and offset > 0:  # stamps accepted: commanding until the stream ends, then the hold
            assert r["holds"][0] <= r["stop"] + bound and max(r["regular"]) > MAX_AGE + PERIOD, what
            assert int(r["last"][f"future_stamps_{'camera_front' if stream == 'camera' else 'joint_states'}"]) == 0
            continue
        assert r["holds"][0] <= bound, what  # within max_age + one period of the first offset message
        if offset > 0:  # every message stamped ahead was refused and counted, as a future stamp and a bad message
            assert any("ahead of this node's clock" in s for s in r["states"]), what
            assert r["n_offset"] >= 3, what
        else:
            assert any("clock offset?" in s for s in r["states"]), what
    for (stream, offset), r in results.items():  # the figures (pytest -s)
        print(f"future_tolerance {tolerance or 'default'}: clock offset {stream} {offset:+} s: hold {r['holds'][0]:.3f} s after the first offset message "
              f"(bound {bound:.2f} s), last chunk {max(r['regular'], default=float('nan')):.3f} s, "
              f"stream stopped at {r['stop']:.3f} s, offset seen {[round(o, 3) for o in r['offsets'][:3]]}")
    if tolerance is not None:
        return
    assert int(results["camera", 5.0]["last"]["future_stamps_camera_front"]) == results["camera", 5.0]["n_offset"]
    assert int(results["joints", 5.0]["last"]["future_stamps_joint_states"]) == results["joints", 5.0]["n_offset"]
    assert int(results["joints", 5.0]["last"]["bad_camera_front"]) == results["camera", 5.0]["n_offset"]
    assert int(results["joints", 5.0]["last"]["bad_joint_states"]) == results["joints", 5.0]["n_offset"]
    assert int(results["joints", 5.0]["last"]["internal_errors"]) == 0


def test_corrupt_compressed_frames_are_all_counted_on_arrival(tiny_model, tmp_path):
    """Issue 24.2: with a compressed camera at 30 Hz and a 10 Hz policy, only a third of the frames are ever
    decoded; the header checks on arrival count every corrupt one, each class exactly, and the node keeps
    commanding. Also bytes that are no CompressedImage / JointState at all (raw subscriptions)."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import CompressedImage, JointState
    from trajectory_msgs.msg import JointTrajectory
    from diagnostic_msgs.msg import DiagnosticArray

    from vqbet_ros import ros_convert

    cal_path = _calibration(tmp_path / "cal.yaml", compressed_topic="/cam/front/compressed")
    cal = load_calibration(cal_path)
    env = ros_env()
    log_path = tmp_path / "node.log"
    proc = _start_node(tiny_model, cal_path, env, log_path)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(env["ROS_DOMAIN_ID"]))
    node = rclpy.create_node("corrupt_peer", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    got, diags = [], []
    node.create_subscription(JointTrajectory, "/arm_controller/joint_trajectory", lambda m: got.append(time.time()), 50)
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diags.extend(
        {kv.key: kv.value for kv in st.values} for st in m.status if st.name.startswith("policy_node")), 50)
    img_pub = node.create_publisher(CompressedImage, "/cam/front/compressed", 10)
    js_pub = node.create_publisher(JointState, "/joint_states", 10)
    mid = (cal.lower + cal.upper) / 2
    rgb = np.random.default_rng(3).integers(0, 255, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8)
    now = lambda: node.get_clock().now().nanoseconds  # noqa: E731
    jpeg = bytes(ros_convert.rgb_to_compressed(rgb, 0, "jpeg").data)
    png = bytes(ros_convert.rgb_to_compressed(rgb, 0, "png").data)
    corrupt = {  # class -> the data of a CompressedImage that must be counted
        "garbage": b"not an image at all",
        "empty": b"",
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "bare_png": png[:8],
        "truncated_png": png[: len(png) - 20],
        "jpeg_without_frame_header": jpeg[:2] + jpeg[-2:],
    }
    state = {"good": True}

    def good_frame():
        if state["good"]:
            img_pub.publish(ros_convert.rgb_to_compressed(rgb, now(), "jpeg"))

    node.create_timer(1 / 30, good_frame)
    node.create_timer(0.01, lambda: js_pub.publish(ros_convert.joint_state(cal.joint_names, mid, now())))

    def spin(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.01)

    def bad_count(key):
        return int(diags[-1][key]) if diags else -1

    def settle(key, expected, what):
        end = time.monotonic() + 20
        while time.monotonic() < end and bad_count(key) < expected:
            spin(0.05)
        spin(0.6)  # the frames were not decoded later and counted again
        assert bad_count(key) == expected, f"{what}: {bad_count(key)} counted, {expected} sent; {diags[-1]}"

    counted = {}
    try:
        end = time.monotonic() + 90
        while not got and time.monotonic() < end and proc.poll() is None:
            spin(0.1)
        assert got, f"no trajectory: {log_path.read_text()[-2000:]}"
        t_first_bad = time.time()
        sent = 0
        for name, data in corrupt.items():
            for _ in range(3):
                msg = CompressedImage(format="jpeg" if "png" not in name else "png", data=data)
                msg.header.stamp = ros_convert.ns_to_time(now())
                img_pub.publish(msg)
                sent += 1
                spin(0.05)
            settle("bad_camera_front", sent, name)
            counted[name] = 3
            assert int(diags[-1]["internal_errors"]) == 0
        print(f"corrupt compressed frames counted: {bad_count('bad_camera_front')} of {sent} ({counted})")
        for _ in range(3):  # bytes that do not deserialize as a CompressedImage at all
            img_pub.publish(b"\x00\x01\x00\x00\xff\xff\xff\x7f")
            spin(0.05)
        settle("bad_camera_front", sent + 3, "undeserializable CompressedImage")
        for _ in range(3):  # nor as a JointState
            js_pub.publish(b"\x00\x01\x00\x00\xff\xff\xff\x7f")
            spin(0.05)
        settle("bad_joint_states", 3, "undeserializable JointState")
        assert int(diags[-1]["internal_errors"]) == 0 and int(diags[-1]["future_stamps_camera_front"]) == 0
        # the good frames in between kept it commanding
        assert sum(t > t_first_bad for t in got) >= 20
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_enable_answers_the_first_call_after_each_restart(tiny_model, tmp_path):
    """Issue 24.5 for the policy: a long-lived client (this test's node) sees policy_node SIGKILLed and restarted;
    once the node's log says ``ready:``, the client's first ~/enable, made after one AnswerProbe round trip
    (vqbet_ros.answering), is answered every time."""
    from std_srvs.srv import SetBool

    from vqbet_ros.answering import AnswerProbe

    cal_path = _calibration(tmp_path / "cal.yaml")
    cal = load_calibration(cal_path)
    env = ros_env()
    peer = Peer(int(env["ROS_DOMAIN_ID"]), cal.joint_names, (cal.lower + cal.upper) / 2)
    probe = AnswerProbe(peer.node, "/policy_node")
    client = peer.node.create_client(SetBool, "/policy_node/enable")

    def wait(future, timeout):
        end = time.monotonic() + timeout
        while not future.done() and time.monotonic() < end:
            time.sleep(0.01)

    answered, proc = [], None
    try:
        for i in range(4):
            log_path = tmp_path / f"node{i}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "vqbet_ros.policy_node", "--ros-args", "-p",
                                         f"model:={tiny_model}", "-p", f"calibration:={cal_path}", "-p",
                                         "task_sequence:=[microwave]", "-p", "threads:=1"],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            peer.wait_for(lambda: "ready:" in log_path.read_text() or proc.poll() is not None, 90, "ready")
            assert proc.poll() is None, log_path.read_text()[-2000:]
            t0 = time.monotonic()
            end = t0 + 30
            while not (client.service_is_ready() and probe.once(wait, 1.0)):
                assert time.monotonic() < end, "the restarted policy_node never answered get_parameters"
                time.sleep(0.05)
            future = client.call_async(SetBool.Request(data=True))
            wait(future, 10.0)
            assert future.done() and future.result().success, f"restart {i}: ~/enable not answered"
            answered.append(round(time.monotonic() - t0, 3))
            proc.kill()  # SIGKILL: its endpoints linger in this client's view
            proc.wait(10)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        peer.close()
    print(f"~/enable answered {answered} s after 'ready:' (probe + call) on each of 4 starts")
    assert len(answered) == 4
