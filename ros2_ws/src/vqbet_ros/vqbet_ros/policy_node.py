"""policy_node: cameras + joint states -> VQ-BeT action chunks -> ``joint_trajectory_controller``.

A thin ROS shell around :class:`vqbet_core.runtime.PolicyRuntime` (DESIGN.md sections 4 and 5). On a
timer at the model's control rate (or on each frame of the first camera, ``trigger: camera``) it
pushes the latest camera frames and joint positions into the runtime, predicts a chunk, blends it with
the overlapping earlier ones (the controller replaces trajectories without blending), makes it safe
(:mod:`vqbet_ros.trajectory`: joint limits, per-step velocity bound, no NaN) and publishes it as one
``trajectory_msgs/JointTrajectory``.

Lifecycle (a managed node, :mod:`vqbet_ros.lifecycle_base`): configure loads and warms up the model and builds
the interfaces, activate commands, deactivate holds (one hold trajectory), cleanup / shutdown release; ``main()``
configures it and, with ``enabled: true``, activates it, so ``ros2 run`` needs no lifecycle manager;
``ros2 lifecycle set /policy_node activate|deactivate`` and ``~/enable`` (the shortcut, once configured) both work.

Safety: starts disabled = inactive (``enabled`` parameter / ``~/enable`` std_srvs/SetBool); stops commanding -
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
  out  ``trajectory_topic`` (JointTrajectory), ``/diagnostics`` (lifecycle and enabled state, input rates and ages, bad-message
       counts, skipped steps, stops, clamping, inference latency p50/p99, subtask progress and completion score),
       ``~/sequence_status`` (std_msgs/String, JSON: the task sequence, current subtask, completion score, advances),
       ``~/step_timing`` (when ``publish_timing``)
  srv  ``~/enable`` (std_srvs/SetBool), ``~/next_goal`` (std_srvs/Trigger: advance ``task_sequence``), the
       lifecycle services ``~/change_state``, ``~/get_state`` ... (lifecycle_msgs)

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

from rcl_interfaces.msg import SetParametersResult
from rclpy.duration import Duration
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Empty, Float64MultiArray, String
from std_srvs.srv import SetBool, Trigger
from trajectory_msgs.msg import JointTrajectory

from vqbet_core.calibration import load_calibration
from vqbet_core.errors import VqbetError
from vqbet_core.recording.clock import OffsetMeter, behind_note, input_age
from vqbet_core.runtime import PolicyRuntime
from vqbet_core.runtime.sequencer import TaskSequencer
from vqbet_core.runtime.session import SessionSettings
from vqbet_ros import ros_convert
from vqbet_ros.cpu_affinity import parse_cpus, pin_process
from vqbet_ros.diagnostics import Diagnostics
from vqbet_ros.lifecycle_base import SUCCESS, ManagedNode
from vqbet_ros.params import declare as declare_parameter
# the ROS-free parts live in policy_inputs (unit tests import them without rclpy); re-exported here
from vqbet_ros.policy_inputs import LOWDIM_KEY, TIMING_FIELDS, Frame, JointStateMerger, RawImage, percentile  # noqa: F401
from vqbet_ros.qos import incompatible_qos_warning, qos_from_parameters
from vqbet_ros.trajectory import (SafetyLimits, UnsafeOutput, hold_trajectory, make_safe_trajectory,
                                  serialize_joint_trajectory)


def check_encoding(encoding: str) -> None:
    """Unsupported encodings are caught on arrival (cheap), so every such message is counted."""
    if encoding not in ros_convert.ENCODING_CHANNELS and not ros_convert.has_cv_bridge():
        raise ros_convert.MessageError(f"unsupported image encoding {encoding!r} (expected one of "
                                       f"{', '.join(ros_convert.ENCODING_CHANNELS)}; more with cv_bridge)")


class PolicyNode(ManagedNode):
    """The policy as a managed node: configure loads and warms up the model, activate commands the arm,
    deactivate holds it, cleanup / shutdown release it (:mod:`vqbet_ros.lifecycle_base`)."""

    def __init__(self, **kwargs):
        super().__init__("policy_node", **kwargs)
        p = self._declare_parameters()
        self.p = p
        if not p["model"]:
            raise VqbetError("parameter model is empty: give an exported model folder (written by vqbet export)")
        if not p["calibration"]:
            raise VqbetError("parameter calibration is empty: give the robot's calibration YAML (joint order and limits)")
        if p["encoder_precision"] not in ("", "fp32", "int8"):
            raise VqbetError(f"parameter encoder_precision must be one of ['', 'fp32', 'int8'], got {p['encoder_precision']!r}")
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
                ("max_tracking_error", p["max_tracking_error"] >= 0, ">= 0 (rad / m; 0 = no bound)"),
                ("hold_settle", p["hold_settle"] >= 0, ">= 0 seconds (0 = one control period)"),
                ("blend_exp_weight", p["blend_exp_weight"] >= 0, ">= 0"),
                ("diagnostics_period", p["diagnostics_period"] > 0, "> 0 seconds"),
                ("threads", p["threads"] >= 0, ">= 0 (0 = onnxruntime's default)"),
                ("completion_threshold", 0 < p["completion_threshold"] <= 1, "in (0, 1] (a completion score)"),
                ("completion_debounce", p["completion_debounce"] >= 0, ">= 0 seconds"),
                ("completion_refractory", p["completion_refractory"] >= 0, ">= 0 seconds")):
            if not ok:
                raise VqbetError(f"parameter {name} must be {expected}, got {p[name]}")
        self.image_qos = qos_from_parameters(self, "image_qos", "best_effort", 5)
        self.state_qos = qos_from_parameters(self, "state_qos", "reliable", 10)
        self.enabled = False  # commanding wanted: true exactly while the node is active
        self.add_on_set_parameters_callback(self._on_set_parameters)

    # -------------------------------------------------------------- lifecycle
    def configure(self) -> None:
        """Load the calibration and the model, warm it up, build the interfaces; a bad file or a model that
        does not fit the calibration is one ``VqbetError`` line (the transition fails, nothing is left behind)."""
        p = self.p
        if p["cpus"]:  # before onnxruntime starts its threads; the DDS threads are moved too
            try:
                pin_process(parse_cpus(p["cpus"]))
            except (ValueError, OSError) as exc:
                raise VqbetError(f"parameter cpus: {exc}") from None
            self.get_logger().info(f"pinned to CPUs {p['cpus']}")
        self.calibration = load_calibration(p["calibration"])
        providers = [v for v in p["providers"] if v] or None
        temperature = None if p["temperature"] < 0 else float(p["temperature"])
        settings = SessionSettings(threads=int(p["threads"]) or None, spin=bool(p["onnx_spin"]),
                                   fp16=bool(p["trt_fp16"]), cache_dir=p["engine_cache_dir"] or None)
        self.runtime = PolicyRuntime(p["model"], providers=providers, seed=int(p["seed"]), temperature=temperature,
                                     settings=settings, precision=p["encoder_precision"] or None)
        spec = self.spec = self.runtime.spec
        # "model": the blending the model was evaluated with (model.yaml sampling.blend)
        self.blend = spec.blend if p["blend"] == "model" else p["blend"]
        self._check_model()
        self._warm_up()
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
                       "tracking_limited_values": 0, "dropped_past_points": 0, "skipped_steps": 0, "internal_errors": 0}
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
        image_qos, state_qos = self.image_qos, self.state_qos
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

    def _warm_up(self) -> None:
        """One encoder + policy run on blank inputs, so the first commanded step does not pay onnxruntime's
        first-run allocations; the history and goal are left as they were (no sampling: the seed's draws stay)."""
        rt, spec, calib = self.runtime, self.spec, self.calibration
        t0 = time.perf_counter()
        goal, goal_name = rt.goal, rt.goal_name
        try:
            images = {}
            for key in spec.image_keys:
                pre = spec.preprocess[key]
                x, y, w, h = pre.crop if pre.crop else (0, 0, 0, 0)
                images[key] = np.zeros((max(pre.size[1], y + h), max(pre.size[0], x + w), 3), np.uint8)
            mid = np.nan_to_num((np.asarray(calib.lower, np.float64) + np.asarray(calib.upper, np.float64)) / 2,
                                posinf=0.0, neginf=0.0)
            rt.observe({LOWDIM_KEY: mid} if LOWDIM_KEY in spec.obs_keys else {}, images, 0.0)
            if spec.goal_dim and spec.goal_names:
                rt.set_goal(spec.goal_names[0])
            if not spec.goal_dim or spec.goal_names:
                rt.heads()
        except (VqbetError, ValueError) as exc:  # a model the blank inputs do not fit: it warms up on its first step
            self.get_logger().warning(f"warm-up skipped: {exc}")
        finally:
            rt.reset()
            rt.goal, rt.goal_name = goal, goal_name
        self.get_logger().info(f"model warmed up in {(time.perf_counter() - t0) * 1e3:.0f} ms")

    def activate(self) -> None:
        """Start commanding (what ``~/enable true`` does); refused while there is no goal to command."""
        if self.sequence_done:
            raise VqbetError("task sequence complete: set the task_sequence parameter to start again")
        if self.spec.goal_dim and not self.sequence:
            raise VqbetError(f"model {self.spec.name} is goal-conditioned: set the task_sequence parameter first "
                             f"(goals: {self.spec.goal_names})")
        self.enabled, self.fresh_start, self.waiting_announced = True, True, False

    def deactivate(self) -> None:
        """Stop commanding: one hold trajectory, then nothing (after a finished task sequence the hold lets
        the last chunk finish its subtask)."""
        self.enabled = False
        if self.sequence_done:
            self._stop("task sequence complete", finish_chunk=True)
        else:
            self._stop("disabled")

    def release(self) -> None:
        """Hold if still commanding (shutdown from active), then drop the model."""
        self.enabled = False
        if getattr(self, "traj_pub", None) is not None:
            self.finish()
        self.runtime = None

    def start_active(self) -> bool:
        return bool(self.p["enabled"])

    def ready_message(self, activated: bool | None) -> str:
        if activated is None:
            return "ready: disabled: call ~/enable (std_srvs/SetBool) with data: true to start commanding"
        if not activated:
            self.get_logger().error(f"cannot start enabled: {self.transition_error}")
            return "ready: NOT enabled (see above): call ~/enable"
        return f"ready: enabled at start: {self._enabled_message()}"

    def state_changed(self) -> None:
        self._publish_diagnostics()

    # -------------------------------------------------------------- parameters and checks
    def _declare_parameters(self) -> dict:
        def declare(name, default, description, array=False, any_type=False):
            return declare_parameter(self, name, default, description, array, any_type)

        return {
            "model": declare("model", "", "exported model folder (vqbet export)"),
            "calibration": declare("calibration", "", "calibration YAML: joint order, limits, velocity bounds, cameras"),
            "enabled": declare("enabled", False, "start active = commanding (default: inactive until ~/enable or a "
                               "lifecycle activate)"),
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
            "max_tracking_error": declare("max_tracking_error", 0.0, "how far (rad, m for prismatic joints) the "
                                          "velocity-bounded command may lead the measured joints; 0 = no bound"),
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
            "completion_debounce": declare("completion_debounce", 0.16, "seconds the completion score must stay "
                                           "at or above the threshold before the goal advances"),
            "completion_refractory": declare("completion_refractory", 1.0, "seconds after an advance during which "
                                             "completion scores do not count (the robot still stands where the "
                                             "last subtask ended)"),
            "seed": declare("seed", 0, "code sampling seed"),
            "temperature": declare("temperature", -1.0, "sampling temperature; < 0 = the model's, 0 = argmax"),
            "providers": declare("providers", [""], "onnxruntime providers; empty = TensorRT > CUDA > CPU", True),
            "threads": declare("threads", 0, "onnxruntime intra-op threads; 0 = onnxruntime's default"),
            "onnx_spin": declare("onnx_spin", SessionSettings.spin, "idle onnxruntime workers busy-wait for the next "
                                 "operator (lower latency on free cores; steals CPU from drivers beside it)"),
            "trt_fp16": declare("trt_fp16", True, "TensorRT provider: build fp16 engines"),
            "encoder_precision": declare("encoder_precision", "", "image encoder: fp32 | int8 (made by vqbet "
                                         "quantize); empty = what model.yaml names"),
            "engine_cache_dir": declare("engine_cache_dir", "", "TensorRT engine / timing cache folder; empty = "
                                        "$VQBET_CACHE/tensorrt, else ~/.cache/vqbet/tensorrt"),
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
            if param.name == "task_sequence" and self.lifecycle_state == "unconfigured":
                self.p["task_sequence"] = list(param.value)  # checked by the next configure
            elif param.name == "task_sequence":
                try:
                    seq = self._check_sequence(param.value)
                except VqbetError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
                self.p["task_sequence"] = list(param.value)  # a later configure starts from it
                self.sequence, self.goal_index, self.sequence_done = seq, 0, False
                self.sequencer = self._make_sequencer(seq)
                self.fresh_start = True  # new task: new episode
                self.get_logger().info(f"task sequence {seq}")
            elif param.name == "enabled":
                return SetParametersResult(successful=False, reason="enabled is the start state: use ~/enable or ros2 lifecycle set")
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
            if self.blend == "none":
                chunk = self.runtime.predict()
            else:
                chunk = self.runtime.predict_blended(mode=self.blend, exp_weight=float(self.p["blend_exp_weight"]))
        except VqbetError as exc:  # the runtime refuses non-finite actions
            self.counts["rejected_outputs"] += 1
            self.get_logger().warning(f"step skipped, prediction rejected: {exc}", throttle_duration_sec=5.0)
            return False
        runtime_ms = (time.perf_counter() - t_rt) * 1e3
        t_pub = time.perf_counter()
        try:
            t_send = self._now()
            # the velocity bound continues the command the controller is following (see make_safe_trajectory)
            commanded = self.last_traj.sample(t_send) if self.commanding and self.last_traj is not None else None
            traj = make_safe_trajectory(chunk.actions, chunk.times, chunk.stamp, q[self.action_idx], t_send,
                                        self.limits, lead=chunk.period, commanded=commanded,
                                        max_tracking_error=float(self.p["max_tracking_error"]))
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
        self.counts["tracking_limited_values"] += traj.tracking_limited
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
        """``~/enable``: the shortcut for the lifecycle transitions activate / deactivate."""
        state = self.lifecycle_state
        if not enable:
            if state != "active":
                self._stop("disabled")
                return True, "already disabled"
            self.trigger_deactivate()
            return True, "disabled"
        if state == "active":
            return True, "already enabled"
        if state != "inactive":
            return False, f"node is {state}: configure it first (ros2 lifecycle set {self.get_fully_qualified_name()} configure)"
        if self.trigger_activate() != SUCCESS:
            return False, self.transition_error or "activate failed"
        return True, self._enabled_message()

    def _enabled_message(self) -> str:
        goal = f", goal {self.sequence[self.goal_index]}" if self.sequence else ""
        return f"enabled{goal}: history restarts at the next step"

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
            if self.lifecycle_state == "active":
                self.trigger_deactivate()  # the hook holds, letting the last chunk finish its subtask
            else:
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
                  "lifecycle_state": self.lifecycle_state,
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
        values = {"lifecycle_state": self.lifecycle_state, "enabled": self.enabled, "commanding": self.commanding, "state": self.stop_reason or "commanding",
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
        values["latency_p50_ms"] = f"{percentile(self.latency_ms, 50):.2f}"
        values["latency_p99_ms"] = f"{percentile(self.latency_ms, 99):.2f}"
        values["runtime_p50_ms"] = f"{percentile(self.runtime_ms, 50):.2f}"
        values["runtime_p99_ms"] = f"{percentile(self.runtime_ms, 99):.2f}"
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
    node's shutdown transition sends its hold trajectory with the context still up, repeats are ignored."""
    from vqbet_ros.node_main import run_node, spin_until_stopped

    executors = []

    def spin(node, stopping):
        executor = make_executor(node.p["executor"], node.get_logger())
        executors.append(executor)
        executor.add_node(node)

        def on_error(exc):  # e.g. a message rclpy itself cannot take: never fatal
            if hasattr(node, "counts"):
                node.counts["internal_errors"] += 1
            node.get_logger().error(f"executor: {type(exc).__name__}: {exc}", throttle_duration_sec=5.0)

        spin_until_stopped(node, stopping, executor=executor, until=node.is_finalized, on_error=on_error)

    def cleanup(node):
        node.shut_down()
        for executor in executors:
            executor.shutdown()

    return run_node("policy_node", PolicyNode, args, spin=spin, cleanup=cleanup)


if __name__ == "__main__":
    sys.exit(main())
