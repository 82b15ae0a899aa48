"""scripted_teleop_node: the env's scripted expert as a teleoperator of ``sim_robot_node``.

Why: it closes the record -> train path without hardware. It reads the simulated world from
``/sim/state`` (``sim_state.STATE_HEADER`` + the env's low-dim observation), runs the env's scripted
expert on it and publishes the expert's joint targets on ``/teleop/joint_command`` (sensor_msgs/JointState),
exactly what a human's teleop device would send, so ``recorder_node`` records them as ``action``. Each
command carries the stamp of the state it answers, so a recorder sampling by header stamps pairs every
observation with the command given for it.

The expert of an episode is reset from the episode's seed (``rng([seed, 1])``, as ``vqbet sim-demos``
does) on a local copy of the env reset to the same seed, so env-specific experts see the same world.
The env must take joint targets as its action (``action_is_joint_target``, e.g. blockpush with
``action_mode: target``).

Recording (optional, ``recorder`` parameter set): the node also plays the operator at the recorder's
buttons. It waits until the recorder is really receiving (its ``~/status`` shows joint states flowing
and ``min_subscribers`` nodes, default 1, subscribe to its commands: DDS discovery of a just-started
recorder takes a second or two),
then per episode: ``start_episode``, simulator ``~/reset``, teleoperate until ``/sim/episode_result``,
``end_episode`` (or ``discard_episode`` for a failed one unless ``keep_failed``) - until ``episodes`` are
recorded; with ``exit_when_done`` the process then exits (status 0). Starting the recorder *before* the
reset loses no step: its ticks before the first command (stamped after the reset) are dropped as
incomplete, so the episode starts exactly at the new world's first observation.

Subtask marks (long-horizon envs such as kitchen, DESIGN.md section 9): while recording, each subtask the
simulator reports newly complete on ``subtasks_topic`` (``/sim/subtasks``) for the episode being recorded is
forwarded to the recorder's ``<recorder>/subtask_done`` as JSON ``{"task": name, "stamp": seconds}``, the
stamp being the tick whose observation shows it complete - the operator's "done" key, played by the
simulator's ground truth. The recorder (with ``task_names`` set) turns them into ``data/task_index``. Before
ending an episode the node waits (``mark_wait`` s at most) until the recorder's ``~/status`` has counted
every mark it forwarded and the episode result's ``completed`` list is forwarded, so no mark arrives after
the commit.

Run: ``ros2 run vqbet_ros scripted_teleop_node --ros-args -p env:=blockpush -p "env_args:='{action_mode: target}'"``
(add ``-p recorder:=/recorder_node -p episodes:=10`` to record).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from vqbet_core.errors import VqbetError
from vqbet_ros import ros_convert
from vqbet_ros.params import declare as declare_parameter
from vqbet_ros.sim_state import STATE_HEADER, make_sim_env, parse_env_args

H = {name: i for i, name in enumerate(STATE_HEADER)}


class ExpertDriver:
    """ROS-free core: /sim/state vectors in, expert joint targets out (one per new step of a running episode)."""

    def __init__(self, env):
        if not getattr(env, "action_is_joint_target", False):
            raise VqbetError(f"env '{env.name}': its action is not joint targets, so its expert cannot teleoperate "
                             "the robot (for blockpush set env_args action_mode: target)")
        self.env = env
        self.joint_names = list(env.joint_names)
        self.expert = env.make_expert()
        obs = env.reset(seed=0)
        self.keys = list(env.obs_keys)
        self.shapes = [np.asarray(obs[k]).shape for k in self.keys]
        self.size = sum(int(np.prod(s)) for s in self.shapes)
        self.episode: tuple[int, int] | None = None  # (episode, seed) the expert was reset for
        self.last_step = -1

    def observation(self, body: np.ndarray) -> dict:
        if body.size != self.size:
            raise ValueError(f"/sim/state carries {body.size} state values, env '{self.env.name}' {self.keys} has {self.size}")
        obs, i = {}, 0
        for key, shape in zip(self.keys, self.shapes):
            n = int(np.prod(shape))
            obs[key] = body[i : i + n].reshape(shape).astype(np.float32)
            i += n
        return obs

    def act(self, data) -> tuple[np.ndarray, int] | None:
        """One /sim/state message -> (joint targets, stamp ns), or None when there is nothing to do."""
        data = np.asarray(data, np.float64)
        if data.size < len(STATE_HEADER):
            raise ValueError(f"/sim/state has {data.size} values, fewer than its {len(STATE_HEADER)} header fields")
        episode, seed, step = int(data[H["episode"]]), int(data[H["seed"]]), int(data[H["step"]])
        if not data[H["running"]]:
            return None
        if self.episode != (episode, seed):
            self.env.reset(seed=seed)  # same world as the simulator, for experts that look at the env
            self.expert.reset(self.env, np.random.default_rng([seed, 1]))
            self.episode, self.last_step = (episode, seed), -1
        if step <= self.last_step:  # the simulator did not step since the last command
            return None
        self.last_step = step
        target = np.asarray(self.expert.act(self.observation(data[len(STATE_HEADER):])), np.float64).reshape(-1)
        if target.size != len(self.joint_names) or not np.all(np.isfinite(target)):
            raise ValueError(f"expert gave {target.tolist()} for joints {self.joint_names}")
        stamp_ns = int(data[H["stamp_sec"]]) * 1_000_000_000 + int(data[H["stamp_nanosec"]])
        return target, stamp_ns


class ScriptedTeleopNode(Node):
    def __init__(self, **kwargs):
        super().__init__("scripted_teleop_node", **kwargs)
        p = self.p = self._declare_parameters()
        if p["episodes"] < 0:
            raise VqbetError(f"parameter episodes must be >= 0 (0 = until stopped), got {p['episodes']}")
        if not p["mark_wait"] >= 0:
            raise VqbetError(f"parameter mark_wait must be >= 0 seconds, got {p['mark_wait']}")
        if p["min_subscribers"] < 1:
            raise VqbetError(f"parameter min_subscribers must be >= 1 (the recorder), got {p['min_subscribers']}")
        self.env = make_sim_env(p["env"], parse_env_args(p["env_args"]))
        self.driver = ExpertDriver(self.env)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.command_pub = self.create_publisher(JointState, p["command_topic"], reliable)
        self.create_subscription(Float64MultiArray, p["state_topic"], self._on_state, reliable)
        self.commands = 0
        self.finished = False
        log = self.get_logger()
        # recording: a small state machine over async service calls (the executor never blocks)
        self.recording = bool(p["recorder"])
        if self.recording:
            rec = p["recorder"].rstrip("/")
            self.services_ = {name: self.create_client(Trigger, srv) for name, srv in (
                ("reset", f"{p['sim_node'].rstrip('/')}/reset"), ("start", f"{rec}/start_episode"),
                ("end", f"{rec}/end_episode"), ("discard", f"{rec}/discard_episode"))}
            self.phase = "waiting"  # waiting for the recorder | starting | resetting | recording | ending | done
            self.recorded = 0
            self.current: int | None = None  # sim episode being recorded
            self.recorder_streams: set[str] = set()  # streams the recorder's ~/status says it receives
            self.create_subscription(String, p["result_topic"], self._on_result, QoSProfile(
                depth=20, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
            self.create_subscription(String, f"{rec}/status", self._on_recorder_status, 10)
            # subtask marks: the simulator's completions of the recorded episode, forwarded to the recorder
            self.mark_pub = self.create_publisher(String, f"{rec}/subtask_done", QoSProfile(
                depth=50, reliability=ReliabilityPolicy.RELIABLE))
            self.create_subscription(String, p["subtasks_topic"], self._on_subtasks, QoSProfile(
                depth=20, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
            self.marks_sent = 0  # marks forwarded in all
            self.episode_marks: list[str] = []  # subtasks forwarded for the episode being recorded
            self.recorder_marks = -1  # marks the recorder has received in all (its ~/status), -1 = not heard
            self.pending_end: tuple | None = None  # (keep, result, deadline ns) of an episode waiting for its marks
            self.create_timer(0.2, self._poll_services)
            log.info(f"recording {p['episodes'] or 'unlimited'} episodes through {rec}")
        log.info(f"expert of env {p['env']} teleoperating joints {self.driver.joint_names} on {p['command_topic']}")

    def _declare_parameters(self) -> dict:
        def declare(name, default, description):
            return declare_parameter(self, name, default, description)  # a wrong type: one line, exit 2

        return {
            "env": declare("env", "blockpush", "simulated env: the same as sim_robot_node's"),
            "env_args": declare("env_args", "", "env arguments (YAML mapping): the same as sim_robot_node's"),
            "state_topic": declare("state_topic", "/sim/state", "simulator state in (Float64MultiArray)"),
            "command_topic": declare("command_topic", "/teleop/joint_command", "joint targets out (JointState)"),
            "result_topic": declare("result_topic", "/sim/episode_result", "episode outcomes in (String, JSON)"),
            "recorder": declare("recorder", "", "recorder node to drive (e.g. /recorder_node); empty = teleop only"),
            "sim_node": declare("sim_node", "/sim_robot_node", "simulator node whose ~/reset starts episodes"),
            "episodes": declare("episodes", 0, "episodes to record; 0 = until stopped"),
            "keep_failed": declare("keep_failed", False, "commit episodes the expert failed (default: discard)"),
            "exit_when_done": declare("exit_when_done", False, "exit once the episodes are recorded"),
            "min_subscribers": declare("min_subscribers", 1, "start recording once this many nodes subscribe to "
                                       "command_topic (the recorder, plus any monitor that must see every command)"),
            "subtasks_topic": declare("subtasks_topic", "/sim/subtasks", "simulator's subtask completions in "
                                      "(String, JSON); forwarded as marks to <recorder>/subtask_done"),
            "mark_wait": declare("mark_wait", 5.0, "longest an episode's end waits for the recorder to count "
                                 "its subtask marks (s)"),
        }

    # -------------------------------------------------------------- teleop
    def _on_state(self, msg) -> None:
        try:
            out = self.driver.act(msg.data)
        except (ValueError, VqbetError) as exc:
            self.get_logger().warning(f"skipped a /sim/state message: {exc}", throttle_duration_sec=5.0)
            return
        if out is None or (self.recording and self.phase == "done"):
            return
        target, stamp_ns = out
        self.command_pub.publish(ros_convert.joint_state(self.driver.joint_names, target, stamp_ns))
        self.commands += 1

    # -------------------------------------------------------------- recording
    def _on_recorder_status(self, msg) -> None:
        try:
            status = json.loads(msg.data)
            self.recorder_streams |= set(status.get("max_latency_s", {}))
            self.recorder_marks = max(self.recorder_marks, int(status.get("marks_received", -1)))
        except (ValueError, AttributeError, TypeError):
            pass
        self._maybe_end()

    def _on_subtasks(self, msg) -> None:
        """The simulator's completions -> "subtask done" marks, only for the episode being recorded."""
        try:
            data = json.loads(msg.data)
            episode, new, stamp = int(data["episode"]), [str(t) for t in data["new"]], float(data["stamp"])
        except (ValueError, KeyError, TypeError) as exc:
            self.get_logger().warning(f"skipped a bad subtask message: {exc}")
            return
        if self.phase not in ("recording", "ending") or episode != self.current:
            return
        for task in new:
            self.mark_pub.publish(String(data=json.dumps({"task": task, "stamp": stamp})))
            self.marks_sent += 1
            self.episode_marks.append(task)
            self.get_logger().info(f"sim episode {episode}: subtask '{task}' done at step {data.get('step')}: marked")
        self._maybe_end()

    def _maybe_end(self) -> None:
        """End the episode once its marks are all forwarded and counted by the recorder (or mark_wait passed)."""
        if self.pending_end is None:
            return
        keep, result, deadline = self.pending_end
        completed = result.get("info", {}).get("completed") if isinstance(result.get("info"), dict) else None
        forwarded = completed is None or len(self.episode_marks) >= len(completed)
        counted = self.marks_sent == 0 or self.recorder_marks >= self.marks_sent
        if not (forwarded and counted):
            if self.get_clock().now().nanoseconds < deadline:
                return
            self.get_logger().warning(
                f"sim episode {result['episode']}: ending without every subtask mark counted (forwarded "
                f"{self.episode_marks}, completed {completed}, recorder counted {self.recorder_marks} of "
                f"{self.marks_sent})")
        self.pending_end = None
        self._call("end" if keep else "discard", lambda r: self._on_ended(r, keep, result))

    def _poll_services(self) -> None:
        self._maybe_end()
        if self.phase != "waiting":
            return
        if (all(c.service_is_ready() for c in self.services_.values()) and "robot_joint" in self.recorder_streams
                and self.command_pub.get_subscription_count() >= self.p["min_subscribers"]):
            self.get_logger().info("simulator and recorder are up; the recorder receives joint states")
            self._next_episode()

    def _call(self, name: str, then) -> None:
        future = self.services_[name].call_async(Trigger.Request())
        future.add_done_callback(lambda f: self._answered(name, f, then))

    def _answered(self, name: str, future, then) -> None:
        try:
            response = future.result()
        except Exception as exc:  # noqa: BLE001 - the service went away
            self._fail(f"{name} call failed: {exc}")
            return
        then(response)

    def _fail(self, why: str) -> None:
        self.get_logger().error(f"recording stopped: {why}")
        self.phase = "done"
        self.finished = True

    def _next_episode(self) -> None:
        if self.p["episodes"] and self.recorded >= self.p["episodes"]:
            self.phase = "done"
            self.finished = True
            self.get_logger().info(f"recorded {self.recorded} episodes: done")
            return
        self.phase = "starting"
        self._call("start", self._on_started)

    def _on_started(self, response) -> None:
        if not response.success:
            self._fail(f"recorder start_episode refused: {response.message}")
            return
        self.phase = "resetting"
        self.recorder_message = response.message
        self._call("reset", self._on_reset_done)

    def _on_reset_done(self, response) -> None:
        if not response.success:
            self._fail(f"simulator ~/reset refused: {response.message}")
            return
        self.current = int(json.loads(response.message)["episode"])
        self.episode_marks = []
        self.phase = "recording"
        self.get_logger().info(f"recording sim episode {self.current}: {self.recorder_message}")

    def _on_result(self, msg) -> None:
        try:
            result = json.loads(msg.data)
            episode, success = int(result["episode"]), bool(result["success"])
        except (ValueError, KeyError, TypeError) as exc:
            self.get_logger().warning(f"skipped a bad episode result: {exc}")
            return
        if self.phase != "recording" or episode != self.current:
            return
        self.phase = "ending"
        keep = success or self.p["keep_failed"]
        deadline = self.get_clock().now().nanoseconds + int(self.p["mark_wait"] * 1e9)
        self.pending_end = (keep, result, deadline)
        self._maybe_end()

    def _on_ended(self, response, kept: bool, result: dict) -> None:
        log = self.get_logger()
        if kept and response.success:
            self.recorded += 1
            log.info(f"sim episode {result['episode']} (success {result['success']}, mode {result.get('mode')}): "
                     f"{response.message} [{self.recorded}/{self.p['episodes'] or '-'}]")
        elif kept:
            log.warning(f"sim episode {result['episode']} not committed: {response.message}")
        else:
            log.info(f"sim episode {result['episode']} failed: discarded ({response.message})")
        self._next_episode()


def main(args=None) -> int:
    from vqbet_ros.node_main import run_node, spin_until_stopped

    def spin(node, stopping):
        spin_until_stopped(node, stopping, until=lambda: node.finished and node.p["exit_when_done"])

    return run_node("scripted_teleop_node", ScriptedTeleopNode, args, spin=spin, cleanup=lambda node: node.env.close())


if __name__ == "__main__":
    sys.exit(main())
