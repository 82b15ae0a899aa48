"""policy_node: cameras + joint states -> VQ-BeT action chunks -> ``joint_trajectory_controller``.

A thin ROS shell around :class:`vqbet_core.runtime.PolicyRuntime` (DESIGN.md sections 4 and 5). On a
timer at the model's control rate (or on each frame of the first camera, ``trigger: camera``) it
pushes the latest camera frames and joint positions into the runtime, predicts a chunk, blends it with
the overlapping earlier ones (the controller replaces trajectories without blending), makes it safe
(:mod:`vqbet_ros.trajectory`: joint limits, per-step velocity bound, no NaN) and publishes it as one
``trajectory_msgs/JointTrajectory``.

Safety: starts disabled (``enabled`` parameter / ``~/enable`` std_srvs/SetBool); stops commanding -
one "hold" trajectory, then nothing - when any input is older than ``max_age`` or missing, and says
why in the log and ``/diagnostics``; the history restarts whenever commanding (re)starts. Input ages follow
the clock rule of :mod:`vqbet_core.recording.clock` (``max(now - stamp, now - receive time)``; stamps more
than ``future_tolerance`` ahead are refused; each stream's clock offset is in ``/diagnostics``), so a
sender's clock ahead of ours cannot stretch ``max_age``. Bad messages (undeserializable bytes, wrong
encoding or size, corrupt JPEG/PNG headers, future stamps, mismatched joint arrays, NaN) are counted on
arrival, logged at a throttled rate and skipped; they never stop the node. docs/reference/safety.md.

Interfaces (every topic can also be remapped):
  in   cameras of the model, topics from the calibration (Image or CompressedImage, ``image_qos.*``);
       ``joint_states_topic`` (JointState, by name; partial messages are merged per joint);
       ``~/goal_reached`` (std_msgs/Empty: advance ``task_sequence``)
  out  ``trajectory_topic`` (JointTrajectory), ``/diagnostics`` (enabled state, input rates and ages, bad-message
       counts, skipped steps, stops, clamping, inference latency p50/p99, subtask progress and completion score),
       ``~/sequence_status`` (std_msgs/String, JSON: the task sequence, current subtask, completion score, advances),
       ``~/step_timing`` (when ``publish_timing``)
  srv  ``~/enable`` (std_srvs/SetBool), ``~/next_goal`` (std_srvs/Trigger: advance ``task_sequence``)

Long-horizon sequences (DESIGN.md section 9): with ``task_sequence`` set, the goal is its current subtask; a
model with a completion head advances it by itself when its completion score stays at or above
``completion_threshold`` for ``completion_debounce`` s (:class:`vqbet_core.runtime.sequencer.TaskSequencer`,
the rule ``vqbet eval --advance model`` uses), the operator with ``~/next_goal`` / ``~/goal_reached``; the
score counts only while enabled; after the last subtask the node holds and disables itself.

Run: ``ros2 run vqbet_ros policy_node --ros-args -p model:=models/NAME -p calibration:=robot.yaml``
or ``python -m vqbet_ros.policy_node --ros-args ...``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque

import numpy as np

from vqbet_core.errors import VqbetError
from vqbet_core.recording.clock import OffsetMeter, behind_note, input_age

# Layout of ~/step_timing (std_msgs/Float64MultiArray), one message per published trajectory.
TIMING_FIELDS = ("stamp", "node_ms", "runtime_ms", "convert_ms", "publish_ms", "preprocess_ms", "encoder_ms",
                 "policy_ms", "sample_decode_ms", "receive_time")
LOWDIM_KEY = "robot_joint"


class JointStateMerger:
    """Latest position of every calibration joint, by name, merged over (possibly partial) JointStates.

    Why merge: some robots publish arm and gripper joints in separate messages. A joint never seen, or
    older than ``max_age``, makes the robot state "not ready"; extra joints are ignored. A message with
    mismatched arrays, duplicate names or a non-finite position for a joint we use is rejected whole
    (``ValueError`` with one line). Ages follow the clock rule of :mod:`vqbet_core.recording.clock`:
    ``max(now - stamp, now - received)``, so a sender's clock ahead of ours cannot keep a dead stream
    fresh. ROS-free, so it is unit-testable.
    """

    def __init__(self, joint_names: list[str]):
        self.joint_names = list(joint_names)
        self.index = {n: i for i, n in enumerate(self.joint_names)}
        self.positions = np.zeros(len(self.joint_names), np.float64)
        self.stamps = np.full(len(self.joint_names), -np.inf)
        self.received = np.full(len(self.joint_names), -np.inf)  # this node's clock when each joint arrived
        self.partial = 0  # messages that carried only some of our joints

    def update(self, names, positions, stamp: float, received: float | None = None) -> int:
        """Merge one message (``received``: its arrival on this node's clock, default ``stamp``); returns how
        many of our joints it carried."""
        names = list(names)
        pos = np.asarray(positions, np.float64).reshape(-1)
        if len(names) != pos.size:
            raise ValueError(f"joint state has {len(names)} names but {pos.size} positions")
        if len(set(names)) != len(names):
            raise ValueError("joint state has duplicate joint names")
        ours = [(self.index[n], i) for i, n in enumerate(names) if n in self.index]
        if not ours:
            return 0
        dst, src = (np.array(v) for v in zip(*ours))
        values = pos[src]
        if not np.all(np.isfinite(values)):
            bad = [names[i] for i in src[~np.isfinite(values)]]
            raise ValueError(f"joint state has non-finite positions for {bad}")
        self.positions[dst] = values
        self.stamps[dst] = stamp
        self.received[dst] = stamp if received is None else received
        if len(ours) < len(self.joint_names):
            self.partial += 1
        return len(ours)

    def problem(self, now: float, max_age: float) -> str | None:
        """Why the joint state is not usable now, or None."""
        missing = [n for n, s in zip(self.joint_names, self.stamps) if not np.isfinite(s)]
        if missing:
            return f"no joint state yet for {missing}"
        ages = self._ages(now)
        i = int(np.argmax(ages))
        if ages[i] > max_age:
            note = behind_note(now, float(self.stamps[i]), float(self.received[i]), max_age)
            return f"joint states are {ages[i]:.3f} s old ({self.joint_names[i]}; max_age {max_age} s){note}"
        return None

    def _ages(self, now: float) -> np.ndarray:
        return np.maximum(now - self.stamps, now - self.received)

    def age(self, now: float) -> float:
        return float(self._ages(now).max()) if np.all(np.isfinite(self.stamps)) else float("inf")


class Frame:
    """The latest message of one camera; converted to RGB once, when a step first needs it."""

    __slots__ = ("msg", "stamp", "received", "rgb")

    def __init__(self, msg, stamp: float, received: float):
        self.msg, self.stamp, self.received, self.rgb = msg, stamp, received, None


class _Stamp:
    __slots__ = ("sec", "nanosec")

    def __init__(self, sec: int, nanosec: int):
        self.sec, self.nanosec = sec, nanosec


class _Header:
    __slots__ = ("stamp", "frame_id")

    def __init__(self, stamp: _Stamp, frame_id: str):
        self.stamp, self.frame_id = stamp, frame_id


class RawImage:
    """``sensor_msgs/Image`` fields read straight from its CDR bytes; ``data`` is a numpy view, not a copy.

    Why: rclpy's deserialization of a 640x480 frame into a Python message copies the pixels into an
    ``array.array`` (about 1 ms); the node takes the serialized bytes (``raw=True``) and reads the
    few header fields itself. Duck-types the message for :mod:`vqbet_ros.ros_convert`.
    """

    __slots__ = ("header", "height", "width", "encoding", "is_bigendian", "step", "data")

    @classmethod
    def parse(cls, raw: bytes) -> "RawImage":
        """Plain CDR (XCDR1), little or big endian; raises ``ValueError`` for anything else or bad lengths."""
        buf = memoryview(raw)
        if len(buf) < 4 or buf[0] != 0 or buf[1] not in (0, 1):
            raise ValueError("not a plain CDR encapsulation")
        order = "<" if buf[1] == 1 else ">"
        body = buf[4:]
        pos = 0

        def u32() -> int:
            nonlocal pos
            pos = (pos + 3) & ~3
            if pos + 4 > len(body):
                raise ValueError("image message is truncated")
            value = int(np.frombuffer(body, np.dtype(order + "u4"), 1, pos)[0])
            pos += 4
            return value

        def string() -> str:
            nonlocal pos
            n = u32()
            if n == 0 or pos + n > len(body):
                raise ValueError("bad string in image message")
            text = bytes(body[pos : pos + n - 1]).decode("utf-8", "replace")
            pos += n
            return text

        img = cls()
        sec = u32()
        img.header = _Header(_Stamp(sec - (1 << 32) if sec >= 1 << 31 else sec, u32()), string())
        img.height, img.width = u32(), u32()
        img.encoding = string()
        if pos >= len(body):
            raise ValueError("image message is truncated")
        img.is_bigendian = int(body[pos])
        pos += 1
        img.step = u32()
        n = u32()
        if pos + n > len(body):
            raise ValueError(f"image data says {n} bytes but the message has {len(body) - pos}")
        img.data = np.frombuffer(body, np.uint8, n, pos)
        return img


def _percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def make_node_class():
    """The rclpy node class (built lazily so ``JointStateMerger`` imports without ROS)."""
    from rcl_interfaces.msg import SetParametersResult
    from rclpy.duration import Duration
    from rclpy.event_handler import SubscriptionEventCallbacks
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CompressedImage, Image, JointState
    from std_msgs.msg import Empty, Float64MultiArray, String
    from std_srvs.srv import SetBool, Trigger
    from trajectory_msgs.msg import JointTrajectory

    from vqbet_core.calibration import load_calibration
    from vqbet_core.runtime import PolicyRuntime
    from vqbet_core.runtime.sequencer import TaskSequencer
    from vqbet_ros import ros_convert
    from vqbet_ros.cpu_affinity import parse_cpus, pin_process
    from vqbet_ros.diagnostics import Diagnostics
    from vqbet_ros.params import declare as declare_parameter
    from vqbet_ros.qos import incompatible_qos_warning, qos_from_parameters
    from vqbet_ros.trajectory import (SafetyLimits, UnsafeOutput, hold_trajectory, make_safe_trajectory,
                                      serialize_joint_trajectory)

    def check_encoding(encoding: str) -> None:
        """Unsupported encodings are caught on arrival (cheap), so every such message is counted."""
        if encoding not in ros_convert.ENCODING_CHANNELS and not ros_convert.has_cv_bridge():
            raise ros_convert.MessageError(f"unsupported image encoding {encoding!r} (expected one of "
                                           f"{', '.join(ros_convert.ENCODING_CHANNELS)}; more with cv_bridge)")

    class PolicyNode(Node):
        def __init__(self, **kwargs):
            super().__init__("policy_node", **kwargs)
            p = self._declare_parameters()
            self.p = p
            if not p["model"]:
                raise VqbetError("parameter model is empty: give an exported model folder (written by vqbet export)")
            if not p["calibration"]:
                raise VqbetError("parameter calibration is empty: give the robot's calibration YAML (joint order and limits)")
            for name, choices in (("trigger", ("timer", "camera")), ("blend", ("model", "average", "exp", "none")),
                                  ("stamp_source", ("header", "receive")), ("executor", ("events", "single"))):
                if p[name] not in choices:
                    raise VqbetError(f"parameter {name} must be one of {list(choices)}, got {p[name]!r}")
            if not p["max_age"] > 0:
                raise VqbetError(f"parameter max_age must be > 0 seconds, got {p['max_age']}")
            for name, ok, expected in (
                    ("future_tolerance", p["future_tolerance"] >= 0, ">= 0 seconds"),
                    ("control_hz", p["control_hz"] >= 0, ">= 0 (0 = the model's)"),
                    ("velocity_scale", p["velocity_scale"] > 0, "> 0 (a fraction of the calibration velocity bound)"),
                    ("hold_settle", p["hold_settle"] >= 0, ">= 0 seconds (0 = one control period)"),
                    ("blend_exp_weight", p["blend_exp_weight"] >= 0, ">= 0"),
                    ("diagnostics_period", p["diagnostics_period"] > 0, "> 0 seconds"),
                    ("threads", p["threads"] >= 0, ">= 0 (0 = onnxruntime's default)"),
                    ("completion_threshold", 0 < p["completion_threshold"] <= 1, "in (0, 1] (a completion score)"),
                    ("completion_debounce", p["completion_debounce"] >= 0, ">= 0 seconds"),
                    ("completion_refractory", p["completion_refractory"] >= 0, ">= 0 seconds")):
                if not ok:
                    raise VqbetError(f"parameter {name} must be {expected}, got {p[name]}")
            if p["cpus"]:  # before onnxruntime starts its threads; the DDS threads are moved too
                try:
                    pin_process(parse_cpus(p["cpus"]))
                except (ValueError, OSError) as exc:
                    raise VqbetError(f"parameter cpus: {exc}") from None
                self.get_logger().info(f"pinned to CPUs {p['cpus']}")
            self.calibration = load_calibration(p["calibration"])
            providers = [v for v in p["providers"] if v] or None
            temperature = None if p["temperature"] < 0 else float(p["temperature"])
            self.runtime = PolicyRuntime(p["model"], providers=providers, seed=int(p["seed"]), temperature=temperature,
                                         threads=int(p["threads"]) or None)
            spec = self.spec = self.runtime.spec
            if p["blend"] == "model":  # the blending the model was evaluated with (model.yaml sampling.blend)
                p["blend"] = spec.blend
            self._check_model()
            calib = self.calibration
            self.action_idx = np.array([calib.joint_names.index(n) for n in spec.joint_names])
            try:
                full = SafetyLimits.from_calibration(calib, p["velocity_scale"])
            except ValueError as exc:
                raise VqbetError(f"parameter velocity_scale / calibration limits: {exc}") from None
            self.limits = SafetyLimits(full.lower[self.action_idx], full.upper[self.action_idx],
                                       full.max_velocity[self.action_idx])
            self.control_hz = float(p["control_hz"] or spec.control_hz)
            self.period = 1.0 / self.control_hz
            self.hold_settle = float(p["hold_settle"] or self.period)
            self.cameras = [k[len("camera_"):] for k in spec.image_keys]
            self.sequence = self._check_sequence(p["task_sequence"])
            self.goal_index = 0
            self.sequencer = self._make_sequencer(self.sequence)

            # state
            self.enabled = False
            self.commanding = False  # a trajectory of ours may be running on the controller
            self.fresh_start = True  # next step starts a new episode (history cleared)
            self.stop_reason = "disabled"
            self.waiting_announced = True  # "waiting for inputs" is said once per enable / stop
            self.sequence_done = False
            self.last_traj = None
            self.last_trigger_stamp = -np.inf
            self.last_receive_wall = 0.0  # wall time the triggering frame arrived (for ~/step_timing)
            self.joints = JointStateMerger(calib.joint_names)
            self.frames: dict[str, Frame | None] = {c: None for c in self.cameras}
            # latest good RGB frame per camera: (rgb, stamp, received on this node's clock)
            self.good: dict[str, tuple[np.ndarray, float, float] | None] = {c: None for c in self.cameras}
            self.counts = {"steps": 0, "published": 0, "holds": 0, "stops": 0, "observe_errors": 0,
                           "rejected_outputs": 0, "late_chunks": 0, "clamped_values": 0, "rate_limited_values": 0,
                           "dropped_past_points": 0, "skipped_steps": 0, "internal_errors": 0}
            self.received = {s: 0 for s in self._streams()}
            self.bad = {s: 0 for s in self._streams()}
            self.future = {s: 0 for s in self._streams()}  # of the bad: stamps beyond future_tolerance
            self.offsets = {s: OffsetMeter() for s in self._streams()}  # stamp - receive time (clock offset)
            self.future_at = {s: -np.inf for s in self._streams()}  # when the last future stamp arrived
            self.last_bad = ""
            self._rate_marks = (time.monotonic(), dict(self.received))
            self.latency_ms = deque(maxlen=500)
            self.runtime_ms = deque(maxlen=500)

            # interfaces
            image_qos = qos_from_parameters(self, "image_qos", "best_effort", 5)
            state_qos = qos_from_parameters(self, "state_qos", "reliable", 10)
            for name in self.cameras:
                cam = calib.cameras[name]
                msg_type = CompressedImage if cam.compressed else Image
                # raw (serialized) subscriptions: bytes rclpy cannot deserialize are a counted bad message here,
                # not an exception inside the executor
                self._subscribe(msg_type, cam.topic, image_qos, "image_qos", self._image_callback(name, cam.compressed),
                                raw=True)
            self._subscribe(JointState, p["joint_states_topic"], state_qos, "state_qos", self._on_joint_state, raw=True)
            self.traj_pub = self.create_publisher(JointTrajectory, p["trajectory_topic"],
                                                  QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
            self.timing_pub = self.create_publisher(Float64MultiArray, "~/step_timing", 50) if p["publish_timing"] else None
            self.create_service(SetBool, "~/enable", self._on_enable)
            self.create_service(Trigger, "~/next_goal", self._on_next_goal)
            self.create_subscription(Empty, "~/goal_reached", self._on_goal_reached, 10)
            # the long-horizon task's state (JSON): current subtask, progress, completion score, advances
            self.status_pub = self.create_publisher(String, "~/sequence_status", QoSProfile(
                depth=10, reliability=ReliabilityPolicy.RELIABLE))
            self.diagnostics = Diagnostics(self, "policy", hardware_id=calib.robot)
            self.add_on_set_parameters_callback(self._on_set_parameters)
            if p["trigger"] == "timer" or not self.cameras:
                self.create_timer(self.period, self._guard(self._on_tick))
            else:  # camera-triggered steps, plus a slow timer so stalls are still noticed
                self.create_timer(self.period, self._guard(self._check_stall))
            self.create_timer(float(p["diagnostics_period"]), self._guard(self._publish_diagnostics))
            log = self.get_logger()
            log.info(f"model {spec.path} ({spec.kind}, {spec.obs_window} obs x {spec.action_chunk} actions, "
                     f"{self.control_hz:g} Hz) on {self.runtime.providers}; cameras {self.cameras or 'none'}; "
                     f"publishing {p['trajectory_topic']}")
            if self.sequence:
                log.info(f"task sequence {self.sequence}")
            if p["enabled"]:
                ok, message = self._set_enabled(True)
                if not ok:
                    log.error(f"cannot start enabled: {message}")
                self._ready_message = f"enabled at start: {message}" if ok else "NOT enabled (see above): call ~/enable"
            else:
                self._ready_message = "disabled: call ~/enable (std_srvs/SetBool) with data: true to start commanding"
            # "ready" only once the executor runs this node's callbacks, so ~/enable answers from then on
            self._ready_timer = self.create_timer(0.01, self._say_ready)

        def _say_ready(self) -> None:
            self._ready_timer.cancel()
            self.destroy_timer(self._ready_timer)
            self.get_logger().info(f"ready: {self._ready_message}")

        # -------------------------------------------------------------- parameters and checks
        def _declare_parameters(self) -> dict:
            def declare(name, default, description, array=False, any_type=False):
                return declare_parameter(self, name, default, description, array, any_type)

            return {
                "model": declare("model", "", "exported model folder (vqbet export)"),
                "calibration": declare("calibration", "", "calibration YAML: joint order, limits, velocity bounds, cameras"),
                "enabled": declare("enabled", False, "start enabled (default: disabled until ~/enable)"),
                "control_hz": declare("control_hz", 0.0, "policy rate; 0 = the model's control_hz"),
                "trigger": declare("trigger", "timer", "timer (steps at control_hz) or camera (on frames of the first camera)"),
                "joint_states_topic": declare("joint_states_topic", "/joint_states", "measured joint states"),
                "trajectory_topic": declare("trajectory_topic", "/arm_controller/joint_trajectory", "controller command"),
                "stamp_source": declare("stamp_source", "header", "input ages from header stamps (0 = receive time) or receive"),
                "max_age": declare("max_age", 0.5, "stop commanding when any input is older than this (s): "
                                   "age = max(now - stamp, now - receive time)"),
                "future_tolerance": declare("future_tolerance", 0.1, "a stamp more than this ahead of the receive "
                                            "time is a bad message (s; sender clock ahead)"),
                "velocity_scale": declare("velocity_scale", 1.0, "fraction of the calibration velocity bound allowed"),
                "blend": declare("blend", "model", "overlapping chunks: model (model.yaml sampling.blend), average (paper), exp, none"),
                "blend_exp_weight": declare("blend_exp_weight", 0.0, "exp blending: weight exp(-w * age in steps)"),
                "hold_on_stop": declare("hold_on_stop", True, "on stop, send one hold trajectory (else just stop sending)"),
                "hold_settle": declare("hold_settle", 0.0, "seconds to come to the hold point; 0 = one control period"),
                "task_sequence": declare("task_sequence", [""], "goal names, in order (goal-conditioned models)", True),
                "advance_on_completion": declare("advance_on_completion", True, "advance task_sequence when the "
                                                 "model's completion score passes completion_threshold (models with "
                                                 "a completion head; ~/next_goal always works)"),
                "completion_threshold": declare("completion_threshold", 0.5, "completion score that counts as "
                                                "'subtask done'"),
                "completion_debounce": declare("completion_debounce", 0.0, "seconds the completion score must stay "
                                               "at or above the threshold before the goal advances"),
                "completion_refractory": declare("completion_refractory", 1.0, "seconds after an advance during which "
                                                 "completion scores do not count (the robot still stands where the "
                                                 "last subtask ended)"),
                "seed": declare("seed", 0, "code sampling seed"),
                "temperature": declare("temperature", -1.0, "sampling temperature; < 0 = the model's, 0 = argmax"),
                "providers": declare("providers", [""], "onnxruntime providers; empty = TensorRT > CUDA > CPU", True),
                "threads": declare("threads", 0, "onnxruntime intra-op threads; 0 = onnxruntime's default"),
                "diagnostics_period": declare("diagnostics_period", 1.0, "seconds between /diagnostics messages"),
                "publish_timing": declare("publish_timing", False, "publish ~/step_timing (benchmarks)"),
                "frame_id": declare("frame_id", "", "header.frame_id of the trajectories"),
                "cpus": str(declare("cpus", "", "CPU ids to pin the node process to, e.g. 3 or '2-3'; empty = not pinned",
                                    any_type=True)),  # cpus:=3 arrives as an integer
                "executor": declare("executor", "events", "events (rclpy's C++ EventsExecutor: lower, steadier latency) "
                                    "or single (SingleThreadedExecutor)"),
            }

        def _check_model(self) -> None:
            spec, calib = self.spec, self.calibration
            where = f"model {spec.path}"
            other = [k for k in spec.obs_keys if k != LOWDIM_KEY]
            if other:
                raise VqbetError(f"{where} needs observation keys {other}; the policy node provides {LOWDIM_KEY} and cameras")
            if LOWDIM_KEY in spec.obs_dims and spec.obs_dims[LOWDIM_KEY] != len(calib.joint_names):
                raise VqbetError(f"{where} expects {spec.obs_dims[LOWDIM_KEY]} joint positions but calibration "
                                 f"{calib.path} has {len(calib.joint_names)} joints")
            unknown = [n for n in spec.joint_names if n not in calib.joint_names]
            if unknown:
                raise VqbetError(f"{where} commands joints {unknown} that calibration {calib.path} does not list "
                                 f"(it has {calib.joint_names})")
            missing = [k for k in spec.image_keys if not k.startswith("camera_") or k[len("camera_"):] not in calib.cameras]
            if missing:
                raise VqbetError(f"{where} uses cameras {missing} that calibration {calib.path} does not define "
                                 f"(it has {list(calib.cameras)})")

        def _check_sequence(self, names) -> list[str]:
            names = [str(n) for n in names if n]
            spec = self.spec
            if names and not spec.goal_dim:
                raise VqbetError(f"parameter task_sequence: model {spec.name} is not goal-conditioned (leave it empty)")
            unknown = [n for n in names if n not in spec.goal_names]
            if unknown:
                raise VqbetError(f"parameter task_sequence: unknown goals {unknown} (model {spec.name} knows {spec.goal_names})")
            return names

        def _on_set_parameters(self, params) -> SetParametersResult:
            for param in params:
                if param.name == "task_sequence":
                    try:
                        seq = self._check_sequence(param.value)
                    except VqbetError as exc:
                        return SetParametersResult(successful=False, reason=str(exc))
                    self.sequence, self.goal_index, self.sequence_done = seq, 0, False
                    self.sequencer = self._make_sequencer(seq)
                    self.fresh_start = True  # new task: new episode
                    self.get_logger().info(f"task sequence {seq}")
                elif param.name == "enabled":
                    return SetParametersResult(successful=False, reason="enabled is the start state: use ~/enable")
                elif param.name != "use_sim_time":
                    return SetParametersResult(successful=False, reason=f"{param.name} is read at start (restart the node)")
            return SetParametersResult(successful=True)

        # -------------------------------------------------------------- inputs
        def _streams(self) -> list[str]:
            return [f"camera_{c}" for c in self.cameras] + ["joint_states"]

        def _subscribe(self, msg_type, topic, qos, prefix, callback, raw=False):
            events = SubscriptionEventCallbacks(incompatible_qos=incompatible_qos_warning(self, topic, prefix))
            return self.create_subscription(msg_type, topic, self._guard(callback), qos, event_callbacks=events, raw=raw)

        def _now(self) -> float:
            return self.get_clock().now().nanoseconds * 1e-9

        def _stamp(self, stream: str, msg, now: float) -> float:
            """The stamp an input is used by (clock rule: :mod:`vqbet_core.recording.clock`); measures the
            stream's clock offset; a stamp beyond ``future_tolerance`` raises (a bad message)."""
            raw = ros_convert.stamp_ns(msg)
            if raw > 0:
                self.offsets[stream].add(raw * 1e-9, now)
            try:
                return ros_convert.choose_stamp(msg, int(now * 1e9), self.p["stamp_source"],
                                                int(self.p["future_tolerance"] * 1e9)) * 1e-9
            except ros_convert.FutureStampError:
                self.future[stream] += 1
                self.future_at[stream] = now
                raise

        def _deserialize(self, raw, msg_type):
            try:
                return deserialize_message(raw, msg_type)
            except Exception as exc:  # noqa: BLE001 - rclpy raises several kinds here
                raise ros_convert.MessageError(f"{msg_type.__name__} message cannot be deserialized ({exc})") from None

        def _bad_message(self, stream: str, exc: Exception) -> None:
            self.bad[stream] += 1
            self.last_bad = f"{stream}: {exc}"
            self.get_logger().warning(f"skipped a bad {stream} message: {exc}", throttle_duration_sec=5.0)

        def _guard(self, callback):
            """Any unexpected exception in a callback is counted and logged, never fatal."""

            def wrapped(*args):
                try:
                    return callback(*args)
                except Exception as exc:  # noqa: BLE001 - the node must survive anything a message causes
                    self.counts["internal_errors"] += 1
                    self.get_logger().error(f"{getattr(callback, '__name__', 'callback')}: {type(exc).__name__}: {exc}",
                                            throttle_duration_sec=5.0)
                    return None

            return wrapped

        def _image_callback(self, name: str, compressed: bool):
            stream = f"camera_{name}"

            def on_image(msg) -> None:
                t_recv = time.perf_counter()
                self.last_receive_wall = time.time()
                now = self._now()
                self.received[stream] += 1
                try:
                    if compressed:  # header checks on arrival: every corrupt frame is counted, used or not
                        msg = self._deserialize(msg, CompressedImage)
                        ros_convert.check_compressed(msg)
                    else:  # serialized bytes (raw subscription): read in place, no pixel copy
                        try:
                            msg = RawImage.parse(msg)
                        except ValueError:  # an encapsulation we do not parse ourselves, or a broken message
                            msg = self._deserialize(msg, Image)
                        check_encoding(msg.encoding)
                        ros_convert.check_image(msg)
                    stamp = self._stamp(stream, msg, now)
                except ros_convert.MessageError as exc:
                    self._bad_message(stream, exc)
                    return
                self.frames[name] = Frame(msg, stamp, now)
                if self.p["trigger"] == "camera" and name == self.cameras[0]:
                    # by frame stamps, not arrival times: a 30 Hz camera drives a 10 Hz policy with every 3rd
                    # frame, and arrival jitter does not skip frames when both rates are equal
                    if stamp - self.last_trigger_stamp >= 0.9 * self.period:
                        self.last_trigger_stamp = stamp
                        self._step(now, stamp, t_recv)

            on_image.__name__ = f"on_image_{name}"
            return on_image

        def _on_joint_state(self, raw) -> None:
            now = self._now()
            self.received["joint_states"] += 1
            try:
                msg = self._deserialize(raw, JointState)
                self.joints.update(msg.name, msg.position, self._stamp("joint_states", msg, now), now)
            except ValueError as exc:
                self._bad_message("joint_states", exc)

        def _frame(self, name: str, compressed: bool) -> tuple[np.ndarray, float, float] | None:
            """Latest good RGB frame of a camera (converted once); a frame that fails to convert is skipped."""
            frame = self.frames[name]
            if frame is not None and frame.rgb is None:
                self.frames[name] = None
                try:
                    rgb = (ros_convert.compressed_to_rgb(frame.msg) if compressed else ros_convert.image_to_rgb(frame.msg))
                    self.good[name] = (rgb, frame.stamp, frame.received)
                except ros_convert.MessageError as exc:
                    self._bad_message(f"camera_{name}", exc)
            return self.good[name]

        def _input_problem(self, now: float) -> str | None:
            max_age = float(self.p["max_age"])
            for name in self.cameras:
                good = self._frame(name, self.calibration.cameras[name].compressed)
                if good is None:
                    return f"no image yet from camera {name} ({self.calibration.cameras[name].topic})"
                age = input_age(now, good[1], good[2])
                if age > max_age:
                    return (f"camera {name} is {age:.3f} s old (max_age {max_age} s)"
                            f"{behind_note(now, good[1], good[2], max_age)}{self._future_note(f'camera_{name}', good[2])}")
            problem = self.joints.problem(now, max_age)
            if problem and np.all(np.isfinite(self.joints.received)):
                problem += self._future_note("joint_states", float(self.joints.received.min()))
            return problem

        def _future_note(self, stream: str, received: float) -> str:
            """Why a stream that still arrives is stale: its newer messages were refused for future stamps."""
            if self.future_at[stream] <= received:
                return ""
            return (f"; its newer messages are stamped {self.offsets[stream].offset():.3f} s ahead of this node's "
                    f"clock (refused: future_tolerance {self.p['future_tolerance']} s)")

        # -------------------------------------------------------------- control
        def _on_tick(self) -> None:
            self._step(self._now(), None, time.perf_counter())

        def _check_stall(self) -> None:
            if self.enabled:
                now = self._now()
                problem = self._input_problem(now)
                if problem:
                    self._stop(problem)

        def _step(self, now: float, stamp: float | None, t_recv: float) -> None:
            """One control step: inputs -> runtime -> safe trajectory -> publish."""
            if self.enabled and not self._try_step(now, stamp, t_recv):
                self.counts["skipped_steps"] += 1  # a control period without a new command, whatever the reason

        def _try_step(self, now: float, stamp: float | None, t_recv: float) -> bool:
            t_conv = time.perf_counter()
            problem = self._input_problem(now)
            if problem:
                self._stop(problem)
                return False
            images = {f"camera_{c}": self.good[c][0] for c in self.cameras}
            convert_ms = (time.perf_counter() - t_conv) * 1e3
            if self.fresh_start:
                self._reset_episode()
            obs_stamp = now if stamp is None else stamp
            self.counts["steps"] += 1
            q = self.joints.positions.copy()
            t_rt = time.perf_counter()
            try:
                self.runtime.observe({LOWDIM_KEY: q} if LOWDIM_KEY in self.spec.obs_keys else {}, images, obs_stamp)
            except VqbetError as exc:  # e.g. a frame the calibration's crop does not fit
                self.counts["observe_errors"] += 1
                self.get_logger().warning(f"step skipped, observation rejected: {exc}", throttle_duration_sec=5.0)
                return False
            try:
                if self.p["blend"] == "none":
                    chunk = self.runtime.predict()
                else:
                    chunk = self.runtime.predict_blended(mode=self.p["blend"], exp_weight=float(self.p["blend_exp_weight"]))
            except VqbetError as exc:  # the runtime refuses non-finite actions
                self.counts["rejected_outputs"] += 1
                self.get_logger().warning(f"step skipped, prediction rejected: {exc}", throttle_duration_sec=5.0)
                return False
            runtime_ms = (time.perf_counter() - t_rt) * 1e3
            t_pub = time.perf_counter()
            try:
                traj = make_safe_trajectory(chunk.actions, chunk.times, chunk.stamp, q[self.action_idx], self._now(),
                                            self.limits, lead=chunk.period)
            except UnsafeOutput as exc:
                kind = "late_chunks" if "in the past" in str(exc) else "rejected_outputs"
                self.counts[kind] += 1
                self.get_logger().warning(f"chunk not sent: {exc}", throttle_duration_sec=5.0)
                self._completion_advances(obs_stamp)
                return False
            self.traj_pub.publish(serialize_joint_trajectory(traj, self.spec.joint_names, self.p["frame_id"]))
            done = time.perf_counter()
            self.last_traj, self.commanding, self.stop_reason = traj, True, ""
            self.counts["published"] += 1
            self.counts["clamped_values"] += traj.clamped
            self.counts["rate_limited_values"] += traj.rate_limited
            self.counts["dropped_past_points"] += traj.dropped_past
            node_ms = (done - t_recv) * 1e3
            self.latency_ms.append(node_ms)
            self.runtime_ms.append(runtime_ms)
            if self.timing_pub is not None:
                tm = chunk.timings
                self.timing_pub.publish(Float64MultiArray(data=[
                    float(obs_stamp), node_ms, runtime_ms, convert_ms, (done - t_pub) * 1e3, tm.get("preprocess", 0.0),
                    tm.get("encoder", 0.0), tm.get("policy", 0.0), tm.get("sample_decode", 0.0),
                    self.last_receive_wall if stamp is not None else time.time() - node_ms * 1e-3]))
            # the score after the chunk is sent: "done now" means this step's chunk finishes the subtask (it was
            # computed for it), and the goal moves on from the next step - what `vqbet eval --advance model` does
            self._completion_advances(obs_stamp)
            return True

        def _reset_episode(self) -> None:
            goal = self.sequence[self.goal_index] if self.sequence else None
            self.runtime.reset(goal=goal)
            self.fresh_start = False
            self.get_logger().info(f"new episode: history cleared{f', goal {goal}' if goal else ''}")

        def _stop(self, reason: str, finish_chunk: bool = False) -> None:
            """Stop commanding: one hold trajectory (where the last one is now, or with ``finish_chunk`` where it
            ends: the sequence's last chunk still completes its subtask), then nothing until restarted."""
            if self.commanding:
                self.counts["stops"] += 1
                self.get_logger().warning(f"stopped commanding: {reason}")
                if self.p["hold_on_stop"] and self.last_traj is not None:
                    now = self._now()
                    when = max(float(self.last_traj.times[-1]), now) if finish_chunk else now
                    hold = hold_trajectory(self.last_traj.sample(when), now, max(when - now, self.hold_settle),
                                           self.limits)
                    self.traj_pub.publish(serialize_joint_trajectory(hold, self.spec.joint_names, self.p["frame_id"]))
                    self.counts["holds"] += 1
                self.commanding = False
                self.waiting_announced = True  # the stop itself said why
            elif self.enabled and not self.waiting_announced:
                self.get_logger().warning(f"enabled, waiting for inputs: {reason}")
                self.waiting_announced = True
            self.stop_reason = reason
            self.fresh_start = True

        def _set_enabled(self, enable: bool) -> tuple[bool, str]:
            if not enable:
                was = self.enabled
                self.enabled = False
                self._stop("disabled")
                return True, "disabled" if was else "already disabled"
            if self.sequence_done:
                return False, "task sequence complete: set the task_sequence parameter to start again"
            if self.spec.goal_dim and not self.sequence:
                return False, (f"model {self.spec.name} is goal-conditioned: set the task_sequence parameter first "
                               f"(goals: {self.spec.goal_names})")
            if self.enabled:
                return True, "already enabled"
            self.enabled, self.fresh_start, self.waiting_announced = True, True, False
            goal = f", goal {self.sequence[self.goal_index]}" if self.sequence else ""
            return True, f"enabled{goal}: history restarts at the next step"

        def _on_enable(self, request, response):
            try:
                response.success, response.message = self._set_enabled(bool(request.data))
            except Exception as exc:  # noqa: BLE001 - a service call must always get an answer
                self.counts["internal_errors"] += 1
                response.success, response.message = False, f"{type(exc).__name__}: {exc}"
            if response.success:
                self.get_logger().info(f"~/enable: {response.message}")
            else:
                self.get_logger().warning(f"~/enable refused: {response.message}")
            return response

        def _make_sequencer(self, seq: list[str]):
            if not seq:
                return None
            return TaskSequencer(seq, known=list(self.spec.goal_names), threshold=float(self.p["completion_threshold"]),
                                 debounce=float(self.p["completion_debounce"]),
                                 refractory=float(self.p["completion_refractory"]))

        def _completion_advances(self, stamp: float) -> bool:
            """Feed the step's completion score to the sequence (DESIGN.md section 9); True when the goal moved."""
            if self.sequencer is None or self.runtime.completion is None or not self.p["advance_on_completion"]:
                return False
            if not self.sequencer.update(self.runtime.completion, stamp, active=self.enabled):
                return False
            ok, message = self._after_advance()
            self.get_logger().info(f"completion score {self.runtime.completion:.2f}: {message}")
            return True

        def _advance_goal(self) -> tuple[bool, str]:
            if not self.sequence:
                return False, "no task_sequence set"
            if self.sequence_done:
                return False, "task sequence already complete"
            self.sequencer.advance(self._now(), "operator")
            return self._after_advance()

        def _after_advance(self) -> tuple[bool, str]:
            """The sequencer moved on: the next goal (same episode, history kept), or hold when it is finished."""
            self.goal_index = min(self.sequencer.index, len(self.sequence) - 1)
            if self.sequencer.finished:
                self.sequence_done = True
                self.enabled = False
                self._stop("task sequence complete", finish_chunk=True)
                message = "task sequence complete: disabled"
            else:
                goal = self.sequence[self.goal_index]
                self.runtime.set_goal(goal)
                message = f"goal {self.goal_index + 1}/{len(self.sequence)}: {goal}"
            self._publish_status()
            return True, message

        def _publish_status(self) -> None:
            seq = self.sequencer
            status = {"task_sequence": self.sequence, "goal": self.sequence[self.goal_index] if self.sequence else "",
                      "done": seq.index if seq else 0, "length": len(self.sequence),
                      "finished": bool(self.sequence_done), "enabled": self.enabled,
                      "completion_score": self.runtime.completion,
                      "threshold": float(self.p["completion_threshold"]),
                      "advances": [{"stamp": t, "subtask": name, "by": by} for t, name, by in (seq.events if seq else [])]}
            self.status_pub.publish(String(data=json.dumps(status)))

        def _on_next_goal(self, request, response):
            try:
                response.success, response.message = self._advance_goal()
            except Exception as exc:  # noqa: BLE001
                self.counts["internal_errors"] += 1
                response.success, response.message = False, f"{type(exc).__name__}: {exc}"
            self.get_logger().info(f"~/next_goal: {response.message}")
            return response

        def _on_goal_reached(self, msg) -> None:
            ok, message = self._advance_goal()
            self.get_logger().info(f"~/goal_reached: {message}")

        # -------------------------------------------------------------- diagnostics
        def _publish_diagnostics(self) -> None:
            now, mono = self._now(), time.monotonic()
            t0, before = self._rate_marks
            dt = max(mono - t0, 1e-6)
            self._rate_marks = (mono, dict(self.received))
            values = {"enabled": self.enabled, "commanding": self.commanding, "state": self.stop_reason or "commanding",
                      "goal": self.sequence[self.goal_index] if self.sequence else "",
                      "goal_index": self.goal_index, "task_sequence": ",".join(self.sequence),
                      "sequence_progress": f"{self.sequencer.index if self.sequencer else 0}/{len(self.sequence)}",
                      "completion_score": "" if self.runtime.completion is None else f"{self.runtime.completion:.3f}",
                      "control_hz": self.control_hz, "providers": ",".join(self.runtime.providers),
                      "max_age": self.p["max_age"], "future_tolerance": self.p["future_tolerance"]}
            for s in self._streams():
                values[f"rate_{s}_hz"] = f"{(self.received[s] - before[s]) / dt:.2f}"
                values[f"bad_{s}"] = self.bad[s]
                values[f"future_stamps_{s}"] = self.future[s]
                values[f"clock_offset_{s}_s"] = self.offsets[s].text()
            for name in self.cameras:
                good = self.good[name]
                values[f"age_camera_{name}_s"] = f"{input_age(now, good[1], good[2]):.3f}" if good else "inf"
            values["age_joint_states_s"] = f"{self.joints.age(now):.3f}"
            values["partial_joint_states"] = self.joints.partial
            values.update(self.counts)
            values["latency_p50_ms"] = f"{_percentile(self.latency_ms, 50):.2f}"
            values["latency_p99_ms"] = f"{_percentile(self.latency_ms, 99):.2f}"
            values["runtime_p50_ms"] = f"{_percentile(self.runtime_ms, 50):.2f}"
            values["runtime_p99_ms"] = f"{_percentile(self.runtime_ms, 99):.2f}"
            values["last_bad_message"] = self.last_bad
            if not self.enabled:
                level, message = "ok", "disabled" if not self.sequence_done else "task sequence complete"
            elif self.commanding:
                level, message = "ok", "commanding"
            else:
                level, message = "warn", f"not commanding: {self.stop_reason}"
            self.diagnostics.publish(level, message, values)
            if self.sequence:
                self._publish_status()

        def finish(self) -> None:
            """On shutdown: leave the arm holding, not finishing a chunk nobody supervises."""
            if self.commanding:
                try:
                    self._stop("node shutting down")
                    # the hold must reach the controller before this process's DDS participant goes away
                    self.traj_pub.wait_for_all_acked(Duration(seconds=1.0))
                except Exception:  # noqa: BLE001 - context may already be gone
                    pass

    return PolicyNode


def make_executor(kind: str, logger=None, context=None):
    """The node's executor. ``events``: rclpy's EventsExecutor (C++ event queue; on 2 cores it cut the
    p99 image -> trajectory overhead from 6.4 to 3.8 ms in one ``vqbet bench ros`` run), falling back to
    the SingleThreadedExecutor where this rclpy lacks it; ``single``: the SingleThreadedExecutor."""
    from rclpy.executors import SingleThreadedExecutor

    if kind == "events":
        try:
            from rclpy.experimental import EventsExecutor
        except ImportError:
            if logger is not None:
                logger.warning("executor 'events': this rclpy has no rclpy.experimental.EventsExecutor, "
                               "using the SingleThreadedExecutor")
            return SingleThreadedExecutor(context=context)
        return EventsExecutor(context=context)
    return SingleThreadedExecutor(context=context)


def main(args=None) -> int:
    """SIGINT / SIGTERM as every vqbet node (``node_main.run_node``): the first one stops the spin loop, the
    node sends its hold trajectory in ``finish()`` with the context still up, repeats are ignored."""
    from vqbet_ros.node_main import run_node, spin_until_stopped

    executors = []

    def spin(node, stopping):
        executor = make_executor(node.p["executor"], node.get_logger())
        executors.append(executor)
        executor.add_node(node)

        def on_error(exc):  # e.g. a message rclpy itself cannot take: never fatal
            node.counts["internal_errors"] += 1
            node.get_logger().error(f"executor: {type(exc).__name__}: {exc}", throttle_duration_sec=5.0)

        spin_until_stopped(node, stopping, executor=executor, on_error=on_error)

    def cleanup(node):
        node.finish()
        for executor in executors:
            executor.shutdown()

    return run_node("policy_node", make_node_class(), args, spin=spin, cleanup=cleanup)


if __name__ == "__main__":
    sys.exit(main())
