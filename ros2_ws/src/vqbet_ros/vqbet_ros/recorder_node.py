"""recorder_node: teleoperated demonstrations -> zarr dataset (DESIGN.md sections 3 and 5).

A thin ROS shell around :mod:`vqbet_core.recording` (the same sampler and writer ``vqbet bag2zarr``
uses): subscriptions push decoded messages with their stamps, a timer at ``control_hz`` advances the
sampling clock, services start / end / discard episodes. Crash safety is the dataset contract: an
episode is visible only once committed, and the store is repaired on start.

Lifecycle (a managed node, :mod:`vqbet_ros.lifecycle_base`): configure opens the store, activate accepts
episodes, deactivate commits (or discards, per ``on_shutdown``) the open episode and refuses new ones,
cleanup / shutdown close the store. ``main()`` configures it and activates it unless ``start_active: false``,
so ``ros2 run`` records as before; ``ros2 lifecycle set /recorder_node deactivate|activate`` works too.

Interfaces (all names are parameters or remaps):
  in   cameras from the calibration (Image or CompressedImage), ``joint_states_topic``, ``command_topic``
       (JointState or JointTrajectory, ``command_type``), ``~/task`` (std_msgs/String: label of the episode),
       ``~/subtask_done`` (std_msgs/String: "subtask done" marks of a long-horizon recording, DESIGN.md section 9 -
       a plain subtask name, stamped with the receive time, or JSON ``{"task": name, "stamp": seconds}``)
  srv  ``~/start_episode``, ``~/end_episode``, ``~/discard_episode`` (std_srvs/Trigger), the lifecycle services
       ``~/change_state``, ``~/get_state`` ... (lifecycle_msgs)
  out  ``~/status`` (std_msgs/String, JSON, with ``lifecycle_state``), ``~/episode_events`` (std_msgs/String, JSON markers that
       ``vqbet bag2zarr --episode-topic`` understands), ``/diagnostics``

Run: ``ros2 run vqbet_ros recorder_node --ros-args -p output:=demo.zarr -p calibration:=robot.yaml``
or ``python -m vqbet_ros.recorder_node --ros-args ...``.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.task import Future
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.event_handler import SubscriptionEventCallbacks
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from vqbet_core.calibration import load_calibration
from vqbet_core.errors import VqbetError
from vqbet_core.recording.clock import OffsetMeter
from vqbet_core.recording.messages import check_stamp, parse_subtask_mark
from vqbet_core.recording.sampler import (
    RECORDING_CHECK_KEYS,
    DiskFullError,
    EpisodeWriter,
    Lazy,
    StreamSampler,
    camera_key,
    dataset_attrs,
    stream_keys,
)
from vqbet_ros import ros_convert
from vqbet_ros.diagnostics import Diagnostics
from vqbet_ros.lifecycle_base import ManagedNode
from vqbet_ros.node_main import run_node
from vqbet_ros.params import declare as declare_parameter
from vqbet_ros.qos import incompatible_qos_warning, qos_from_parameters

MB = 1024 * 1024


class RecorderNode(ManagedNode):
    """Samples cameras, joint states and the teleop command at ``control_hz`` into episodes.

    A managed node (:mod:`vqbet_ros.lifecycle_base`): configure opens (and repairs) the store and builds the
    interfaces, activate accepts episodes, deactivate closes the open episode by the ``on_shutdown`` rule
    (commit or discard) and refuses new ones, cleanup / shutdown close the store."""

    def __init__(self, **kwargs):
        super().__init__("recorder_node", **kwargs)
        p = self._declare_parameters()
        _check_parameters(p)
        self.params = p
        # deep queues: a recorder that stalls for a moment catches up instead of losing frames
        self.image_qos = qos_from_parameters(self, "image_qos", "reliable", 30)
        self.state_qos = qos_from_parameters(self, "state_qos", "reliable", 500)
        self.task = p["task"]
        self.task_names = [str(n) for n in p["task_names"] if str(n)]
        if len(set(self.task_names)) != len(self.task_names):
            raise VqbetError(f"parameter task_names has a name twice: {self.task_names}")
        self.accepting = False  # accepts episodes: true exactly while the node is active
        self.writer = None
        self.add_on_set_parameters_callback(self._on_set_parameters)

    # ------------------------------------------------------------------ lifecycle
    def configure(self) -> None:
        """Open the store (repairing an interrupted episode), subscribe, offer the episode services."""
        p = self.params
        self.calibration = load_calibration(p["calibration"])
        cams = [c for c in p["cameras"] if c] or list(self.calibration.cameras)
        unknown = [c for c in cams if c not in self.calibration.cameras]
        if unknown:
            raise VqbetError(f"parameter cameras: {unknown} not in calibration {p['calibration']} "
                             f"(has: {list(self.calibration.cameras)})")
        image_qos, state_qos = self.image_qos, self.state_qos
        self.control_hz = p["control_hz"] or self.calibration.control_hz
        self.stamp_source = p["stamp_source"]
        self.future_tolerance_ns = int(p["future_tolerance"] * 1e9)
        self.command_type = p["command_type"]
        self.mapper = ros_convert.JointMapper(self.calibration.joint_names)
        self.sampler = StreamSampler(stream_keys(cams), self.control_hz, p["max_age"], p["max_wait"])
        # frames a tick will select are decoded and resized on worker threads (OpenCV releases the GIL), so
        # the executor keeps taking messages instead of stalling in cv2.resize
        self.decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self.sampler.prefetch = self.decode_pool.submit
        settings = {"max_age": p["max_age"], "max_wait": p["max_wait"], "stamp_source": p["stamp_source"],
                    "future_tolerance": p["future_tolerance"],
                    "preprocess_images": p["preprocess_images"], "command_topic": p["command_topic"],
                    "command_type": p["command_type"]}
        if self.task_names:  # long-horizon recording: data/task_index from the ~/subtask_done marks
            settings["task_names"] = self.task_names
        attrs = dataset_attrs(self.calibration, cams, self.control_hz, "recorder_node", settings)
        flush = p["flush_every"] or max(1, int(round(self.control_hz)))
        self.writer = EpisodeWriter(p["output"], attrs, min_free_mb=p["min_free_mb"], stop_free_mb=p["stop_free_mb"],
                                    flush_every=flush, background=True, check_keys=RECORDING_CHECK_KEYS)
        log = self.get_logger()
        if self.writer.recovered_steps:
            log.warning(f"{p['output']}: truncated {self.writer.recovered_steps} leftover steps of an interrupted episode")
        log.info(f"recording to {p['output']} ({self.writer.n_episodes} episodes committed), cameras {cams}, "
                 f"{self.control_hz:g} Hz, max_age {p['max_age']} s"
                 + (f", subtasks {self.task_names} (marks on ~/subtask_done)" if self.task_names else ""))
        self.state = "idle"  # idle | recording | stopped (disk)
        self.last_error = ""
        self.latency = {}  # stream -> worst (receive - stamp) seconds since the last status
        self.offsets = {s: OffsetMeter() for s in ("robot_joint", "action", *(camera_key(c) for c in cams))}
        self.future = {}  # stream -> messages refused for a stamp beyond future_tolerance
        self._ending = None  # Future an end_episode call waits on
        # subtask marks: accepted in the open episode, received in all (accepted or not), refused in all
        self.marks = {"episode": 0, "received": 0, "refused": 0}
        self.last_mark = ""
        self.last_mark_error = ""

        for name in cams:
            cam = self.calibration.cameras[name]
            msg_type = CompressedImage if cam.compressed else Image
            pre = cam.preprocess if p["preprocess_images"] else None
            self._subscribe(msg_type, cam.topic, image_qos, "image_qos",
                            self._image_callback(camera_key(name), pre, cam.compressed))
        self._subscribe(JointState, p["joint_states_topic"], state_qos, "state_qos", self._on_joint_state)
        cmd_type = JointTrajectory if self.command_type == "JointTrajectory" else JointState
        self._subscribe(cmd_type, p["command_topic"], state_qos, "state_qos", self._on_command)
        self.create_subscription(String, "~/task", self._on_task, 10)
        self.create_subscription(String, "~/subtask_done", self._on_subtask_done,
                                 QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))

        events_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.status_pub = self.create_publisher(String, "~/status", 10)
        self.events_pub = self.create_publisher(String, "~/episode_events", events_qos)
        self.diagnostics = Diagnostics(self, "recorder", hardware_id=self.calibration.robot)
        # services in their own group: an end_episode waiting for its last ticks must not block the
        # subscriptions and the timer that decide them (one group runs one callback at a time)
        services = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, "~/start_episode", self._on_start, callback_group=services)
        self.create_service(Trigger, "~/end_episode", self._on_end, callback_group=services)
        self.create_service(Trigger, "~/discard_episode", self._on_discard, callback_group=services)
        self.create_timer(1.0 / self.control_hz, self._on_tick)
        self.create_timer(p["status_period"], self._publish_status)

    def activate(self) -> None:
        self.accepting = True

    def deactivate(self) -> None:
        """Refuse new episodes; the open one is committed or discarded as ``on_shutdown`` says."""
        self.accepting = False
        self._close_open_episode("recorder deactivated during the episode", announce=True)

    def release(self) -> None:
        """The shutdown guarantee (the open episode committed or discarded), then the store closed."""
        self.accepting = False
        self.finish()

    def start_active(self) -> bool:
        return bool(self.params["start_active"])

    def ready_message(self, activated: bool | None) -> str:
        if activated:
            return "ready: call ~/start_episode, ~/end_episode, ~/discard_episode (or run record_keyboard)"
        return (f"ready, inactive: episodes are refused until it is activated "
                f"(ros2 lifecycle set {self.get_fully_qualified_name()} activate)")

    def state_changed(self) -> None:
        self._publish_status()

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> dict:
        def declare(name, default, description):
            return declare_parameter(self, name, default, description, array=isinstance(default, list))

        return {
            "output": declare("output", "", "zarr dataset to create or append to"),
            "calibration": declare("calibration", "", "calibration YAML: joint order, cameras, crop/resize"),
            "control_hz": declare("control_hz", 0.0, "sampling rate; 0 = the calibration's control_hz"),
            "max_age": declare("max_age", 0.1, "a tick is dropped when a stream's latest message is older (s)"),
            "max_wait": declare("max_wait", 0.5, "longest a tick waits for a quiet stream's next message (s)"),
            "stamp_source": declare("stamp_source", "header", "header (zero stamps fall back to receive time) or receive"),
            "future_tolerance": declare("future_tolerance", 0.1, "a stamp more than this ahead of the receive time "
                                        "is a bad message, not recorded (s; sender clock ahead)"),
            "joint_states_topic": declare("joint_states_topic", "/joint_states", "measured joint states"),
            "command_topic": declare("command_topic", "/teleop/joint_command", "teleop command, becomes 'action'"),
            "command_type": declare("command_type", "JointState", "JointState or JointTrajectory"),
            "cameras": declare("cameras", [""], "calibration cameras to record; [''] = all"),
            "preprocess_images": declare("preprocess_images", True, "crop/resize frames per calibration at record time"),
            "task": declare("task", "", "task label of the next episode (also settable on ~/task)"),
            "min_free_mb": declare("min_free_mb", 1024.0, "free disk needed to start an episode (MB; settable at run time)"),
            "stop_free_mb": declare("stop_free_mb", 256.0, "below this free disk the open episode is committed and "
                                    "recording stops (MB; settable at run time)"),
            "flush_every": declare("flush_every", 0, "steps per disk write; 0 = one second of steps"),
            "status_period": declare("status_period", 1.0, "seconds between ~/status and /diagnostics messages"),
            "on_shutdown": declare("on_shutdown", "commit", "an episode open at shutdown or a lifecycle deactivate: "
                                   "commit or discard"),
            "task_names": declare("task_names", [""], "subtask names of a long-horizon recording: each step gets "
                                  "data/task_index from the ~/subtask_done marks; [''] = none (no task_index)"),
            "start_active": declare("start_active", True, "start active (accepting episodes); false: inactive until "
                                    "activated (ros2 lifecycle set <node> activate)"),
        }

    def _on_set_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name == "task":
                self._set_task(str(param.value))
            elif param.name in ("min_free_mb", "stop_free_mb"):
                self.params[param.name] = float(param.value)  # the next configure opens the store with it
                if self.writer is not None:
                    setattr(self.writer, param.name[:-3], int(float(param.value) * MB))
        return SetParametersResult(successful=True)

    def _subscribe(self, msg_type, topic, qos, prefix, callback):
        events = SubscriptionEventCallbacks(incompatible_qos=incompatible_qos_warning(self, topic, prefix))
        return self.create_subscription(msg_type, topic, callback, qos, event_callbacks=events)

    # ------------------------------------------------------------------ streams
    def _now(self) -> int:
        return self.get_clock().now().nanoseconds

    def _bad(self, stream: str, exc: Exception, stamp: int | None = None) -> None:
        self.sampler.bad(stream, str(exc), stamp)
        self.get_logger().warning(f"skipped a bad {stream} message: {exc}", throttle_duration_sec=5.0)

    def _stamp(self, stream: str, msg, now: int) -> int:
        """The clock rule (:mod:`vqbet_core.recording.clock`): measures the stream's clock offset; a stamp beyond
        ``future_tolerance`` raises ``FutureStampError`` (a bad message, and its stamp does not move the watermark)."""
        raw = ros_convert.stamp_ns(msg)
        if raw > 0:
            self.offsets[stream].add(raw, now)
        try:
            return ros_convert.choose_stamp(msg, now, self.stamp_source, self.future_tolerance_ns)
        except ros_convert.FutureStampError:
            self.future[stream] = self.future.get(stream, 0) + 1
            raise

    def _image_callback(self, key: str, preprocess, compressed: bool):
        def callback(msg) -> None:
            now = self._now()
            try:
                stamp = self._stamp(key, msg, now)
            except ros_convert.MessageError as exc:
                self._bad(key, exc)
                return
            try:  # cheap checks on arrival: every bad frame is counted, selected by a tick or not
                ros_convert.check_compressed(msg) if compressed else ros_convert.check_image(msg)
            except ros_convert.MessageError as exc:
                self._bad(key, exc, stamp)
                return
            self._latency(key, now, stamp)
            self.sampler.push(key, stamp, Lazy(lambda: ros_convert.frame_for_dataset(msg, preprocess, compressed)))

        return callback

    def _on_joint_state(self, msg: JointState) -> None:
        now = self._now()
        try:
            stamp = self._stamp("robot_joint", msg, now)
        except ros_convert.MessageError as exc:
            self._bad("robot_joint", exc)
            return
        try:
            positions = ros_convert.joint_positions(msg, self.mapper)
        except ros_convert.MessageError as exc:
            self._bad("robot_joint", exc, stamp)
            return
        self._latency("robot_joint", now, stamp)
        self.sampler.push("robot_joint", stamp, positions)

    def _on_command(self, msg) -> None:
        now = self._now()
        try:
            stamp = self._stamp("action", msg, now)
        except ros_convert.MessageError as exc:
            self._bad("action", exc)
            return
        try:
            positions = self.mapper.from_command(msg, self.command_type)
        except ros_convert.MessageError as exc:
            self._bad("action", exc, stamp)
            return
        self._latency("action", now, stamp)
        self.sampler.push("action", stamp, positions)

    def _latency(self, stream: str, now: int, stamp: int) -> None:
        lag = (now - stamp) / 1e9
        if lag > self.latency.get(stream, float("-inf")):
            self.latency[stream] = lag

    def _on_task(self, msg: String) -> None:
        self._set_task(msg.data)

    def _set_task(self, task: str) -> None:
        self.task = task
        if self.writer is not None:
            self.writer.set_task(task)

    def _on_subtask_done(self, msg: String) -> None:
        """A "subtask done" mark: every step stamped before its time, not claimed by an earlier mark, belongs
        to that subtask (:meth:`EpisodeWriter.mark`). A bad mark is counted and logged, never fatal."""
        now = self._now()
        self.marks["received"] += 1
        try:
            task, stamp = parse_subtask_mark(msg.data, now)
            try:  # the clock rule: a stamp beyond future_tolerance is a bad message
                check_stamp(stamp, now, self.future_tolerance_ns)
            except ros_convert.FutureStampError:
                self.future["subtask_done"] = self.future.get("subtask_done", 0) + 1
                raise
            if self.state not in ("recording", "ending"):
                raise VqbetError(f"no episode is being recorded (recorder {self.state})")
            self.writer.mark(stamp, task)
        except VqbetError as exc:
            self.marks["refused"] += 1
            self.last_mark_error = f"{msg.data[:80]!r}: {exc}"
            self.get_logger().warning(f"subtask mark refused ({self.marks['refused']} so far): {self.last_mark_error}")
            self._publish_status()
            return
        self.marks["episode"] += 1
        self.last_mark = task
        self.get_logger().info(f"subtask '{task}' done at {stamp * 1e-9:.3f} s (mark {self.marks['episode']} "
                               f"of episode {self.writer.n_episodes})")
        self._publish_status()  # at once: a teleop waits for its marks to be counted before it ends the episode

    # ------------------------------------------------------------------ clock
    def _on_tick(self) -> None:
        self._take(self._now())

    def _take(self, now: int) -> None:
        """Advance the sampling clock to ``now`` and write the decided ticks; wakes a waiting end_episode."""
        samples = self.sampler.advance(now)
        if self.state not in ("recording", "ending"):
            return
        self._write(samples)
        if self._ending is not None and not self._ending.done() and (self.sampler.done or not self.writer.recording):
            self._ending.set_result(True)

    def _write(self, samples) -> None:
        for stamp, values in samples:
            try:
                self.writer.add(stamp, values)
            except ros_convert.MessageError as exc:
                self._bad("frame", exc)
            except DiskFullError as exc:
                self._stop_for_disk(str(exc))
                return
            except VqbetError as exc:
                self._stop_for_disk(f"writing failed: {exc}")
                return

    def _stop_for_disk(self, reason: str) -> None:
        """Out of space or a failed write: keep what is on disk as a committed episode, stop recording."""
        self.sampler.stop()
        self.last_error = reason
        result = None
        try:
            result = self.writer.commit(note=reason)
        except Exception as exc:  # noqa: BLE001 - even the commit failed: committed episodes stay intact
            self.last_error = f"{reason}; the open episode could not be committed ({exc})"
        self.state = "stopped"
        msg = f"RECORDING STOPPED: {self.last_error}"
        if result is not None and result.index >= 0:
            msg += f" - episode {result.index} kept with {result.length} steps"
            # an end marker covers the ticks up to its stamp: the last step kept
            self._event("end", self.writer.last_stamp, result.index, result.length, note=reason)
        self.get_logger().error(msg + "; free disk space, then start a new episode")
        self._publish_status()

    # ------------------------------------------------------------------ services
    def _on_start(self, request, response):
        if not self.accepting:
            response.success = False
            response.message = (f"recorder is {self.lifecycle_state}: no episodes until it is activated "
                                f"(ros2 lifecycle set {self.get_fully_qualified_name()} activate)")
            return response
        if self.writer.recording:
            response.success = False
            response.message = f"episode {self.writer.n_episodes} is {self.state} (end or discard it first)"
            return response
        now = self._now()
        try:
            index = self.writer.start(task=self.task, source="recorder_node")
        except VqbetError as exc:
            response.success, response.message = False, str(exc)
            self.get_logger().error(f"cannot start an episode: {exc}")
            self.last_error = str(exc)
            return response
        self.sampler.start(now)
        self.state = "recording"
        self.last_error = ""
        self.marks["episode"], self.last_mark = 0, ""
        self._event("start", now, index)
        response.success = True
        response.message = f"episode {index} started" + (f" (task '{self.task}')" if self.task else "")
        self.get_logger().info(response.message)
        self._publish_status()
        return response

    async def _on_end(self, request, response):
        """Commit the open episode: ticks up to now, once each is decided (the watermark rule).

        A coroutine, so the executor keeps taking messages and timer ticks while it waits (at most
        ``max_wait`` plus one tick)."""
        if not self.writer.recording or self.state != "recording":
            response.success = False
            response.message = "no episode is being recorded" if not self.writer.recording else f"episode is {self.state}"
            return response
        end = self._now()
        self.sampler.set_end(end)
        self.state = "ending"
        self._take(end)
        if self.writer.recording and not self.sampler.done:
            self._ending = Future()
            await self._ending
            self._ending = None
        if not self.writer.recording:  # stopped for disk space, or deactivated, while ending
            response.success = False
            response.message = self.last_error or "the episode was closed by a lifecycle transition (deactivate)"
            return response
        stats = self.sampler.stats
        self.sampler.stop()
        try:
            result = self.writer.commit()
        except VqbetError as exc:
            self.state = "idle"
            response.success, response.message = False, f"commit failed: {exc}"
            self.get_logger().error(response.message)
            return response
        self.state = "idle"
        if result.index < 0:
            self._event("discard", end, self.writer.n_episodes)
            response.success = False
            response.message = (f"nothing recorded, episode not committed: {stats.dropped} ticks dropped "
                                f"(stale: {_nonzero(stats.stale)})")
        else:
            self._event("end", end, result.index, result.length, note=result.note)
            response.success = True
            response.message = (f"episode {result.index} committed: {result.length} steps, {stats.dropped} ticks "
                                f"dropped, {sum(stats.bad.values())} bad messages")
            if stats.dropped or stats.late:
                response.message += f" (stale: {_nonzero(stats.stale)}, late: {stats.late})"
        self.get_logger().info(response.message)
        self._publish_status()
        return response

    def _on_discard(self, request, response):
        if not self.writer.recording or self.state != "recording":
            response.success, response.message = False, "no episode is being recorded"
            return response
        self.sampler.stop()
        result = self.writer.discard()
        self.state = "idle"
        self._event("discard", self._now(), self.writer.n_episodes, result.length)
        response.success, response.message = True, f"episode discarded ({result.length} steps dropped)"
        self.get_logger().info(response.message)
        self._publish_status()
        return response

    # ------------------------------------------------------------------ reporting
    def _event(self, event: str, stamp: int, index: int, length: int = 0, note: str = "") -> None:
        data = {"event": event, "stamp_ns": int(stamp), "episode": int(index), "task": self.task}
        if event != "start":
            data["length"] = int(length)
        if note:
            data["note"] = note
        self.events_pub.publish(String(data=json.dumps(data)))

    def status(self) -> dict:
        stats = self.sampler.stats
        return {
            "state": self.state,
            "lifecycle_state": self.lifecycle_state,
            "episode": self.writer.n_episodes,  # index of the open (or next) episode
            "episodes_committed": self.writer.n_episodes,
            "length": self.writer.episode_length if self.writer.recording else 0,
            "task": self.task,
            "dropped": stats.dropped,
            "stale": stats.stale,
            "late": stats.late,
            "bad": stats.bad_total,
            "last_bad": stats.last_bad,
            "disk_free_mb": round(self.writer.disk_free() / MB, 1),
            "max_latency_s": {k: round(v, 4) for k, v in self.latency.items()},
            "clock_offset_s": {k: round(m.offset() * 1e-9, 4) for k, m in self.offsets.items() if m.offset() == m.offset()},
            "future_stamps": dict(self.future),
            "task_names": list(self.task_names),
            "marks": self.marks["episode"],  # subtask marks accepted in the open (or last) episode
            "marks_received": self.marks["received"],
            "marks_refused": self.marks["refused"],
            "last_mark": self.last_mark,
            "last_mark_error": self.last_mark_error,
            "last_error": self.last_error,
        }

    def _publish_status(self) -> None:
        status = self.status()
        self.latency = {}
        self.status_pub.publish(String(data=json.dumps(status)))
        if self.state == "stopped" or status["disk_free_mb"] * MB < self.writer.min_free:
            level = "error" if self.state == "stopped" else "warn"
            message = self.last_error or f"disk space low ({status['disk_free_mb']} MB free)"
        elif status["dropped"] or any(status["bad"].values()):
            level, message = "warn", f"{status['dropped']} ticks dropped, {sum(status['bad'].values())} bad messages"
        elif not self.accepting:
            level, message = "ok", f"{self.lifecycle_state}: not accepting episodes"
        else:
            level, message = "ok", self.state
        values = {k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in status.items()}
        self.diagnostics.publish(level, message, values)

    # ------------------------------------------------------------------ shutdown
    def _close_open_episode(self, note: str, announce: bool = False):
        """Commit (or discard, per ``on_shutdown``) an open episode; ``announce``: also its episode event and
        status (a deactivate, with the node still running). The commit result, or None."""
        if self.writer is None or not self.writer.recording:
            return None
        if announce and self._ending is not None and not self._ending.done():
            self._ending.set_result(True)  # a waiting end_episode answers: closed by the transition
        end = self._now()
        self.sampler.stop()
        self.state = "idle"
        if self.params["on_shutdown"] == "commit":
            result = self.writer.commit(note=note)
            if announce:
                if result.index >= 0:
                    self._event("end", self.writer.last_stamp or end, result.index, result.length, note=note)
                    self.get_logger().info(f"{note}: episode {result.index} committed ({result.length} steps)")
                else:
                    self._event("discard", end, self.writer.n_episodes)
        else:
            result = self.writer.discard()
            if announce:
                self._event("discard", end, self.writer.n_episodes, result.length)
                self.get_logger().info(f"{note}: episode discarded ({result.length} steps, on_shutdown: discard)")
        if announce:
            self._publish_status()
        return result

    def finish(self) -> None:
        """On shutdown: commit (or discard, per ``on_shutdown``) an open episode, stop the writer thread."""
        if self.writer is None:  # never configured (or a configure that failed before the store opened)
            if getattr(self, "decode_pool", None) is not None:
                self.decode_pool.shutdown(wait=False, cancel_futures=True)
            return
        if self.writer.recording:
            result = self._close_open_episode("recorder shut down during the episode")
            if self.params["on_shutdown"] == "commit" and result.index >= 0:
                print(f"recorder_node: committed episode {result.index} ({result.length} steps) at shutdown",
                      file=sys.stderr)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.writer.close()
        self.writer = None


def _check_parameters(p: dict) -> None:
    """Every required / constrained parameter, before anything is opened: one line naming it and what is expected."""
    if not p["calibration"]:
        raise VqbetError("parameter calibration is empty: give the robot's calibration YAML (joint order, cameras)")
    if not p["output"]:
        raise VqbetError("parameter output is empty: give the path of the zarr dataset to create or append to")
    for name, choices in (("command_type", ("JointState", "JointTrajectory")), ("stamp_source", ("header", "receive")),
                          ("on_shutdown", ("commit", "discard"))):
        if p[name] not in choices:
            raise VqbetError(f"parameter {name} must be one of {list(choices)}, got {p[name]!r}")
    for name, ok, expected in (("control_hz", p["control_hz"] >= 0, ">= 0 (0 = the calibration's)"),
                               ("max_age", p["max_age"] > 0, "> 0 seconds"), ("max_wait", p["max_wait"] >= 0, ">= 0 seconds"),
                               ("future_tolerance", p["future_tolerance"] >= 0, ">= 0 seconds"),
                               ("status_period", p["status_period"] > 0, "> 0 seconds"),
                               ("flush_every", p["flush_every"] >= 0, ">= 0 steps (0 = one second of steps)"),
                               ("min_free_mb", p["min_free_mb"] >= 0, ">= 0 MB"), ("stop_free_mb", p["stop_free_mb"] >= 0, ">= 0 MB")):
        if not ok:
            raise VqbetError(f"parameter {name} must be {expected}, got {p[name]}")


def _nonzero(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if v}


def main(args=None) -> int:
    """Configured, then active unless ``start_active: false``; SIGINT / SIGTERM run the shutdown transition (the
    open episode committed or discarded per ``on_shutdown``), repeats ignored (``node_main.run_node``)."""
    return run_node("recorder_node", RecorderNode, args, cleanup=lambda node: node.shut_down())


if __name__ == "__main__":
    sys.exit(main())
