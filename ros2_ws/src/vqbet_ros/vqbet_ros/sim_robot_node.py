"""sim_robot_node: a simulated arm (any ``vqbet_core.sim`` env with joint names) behind the ROS 2 topics of a real one.

The policy and recorder nodes cannot tell it from hardware: it publishes ``/joint_states`` and camera
images and takes ``trajectory_msgs/JointTrajectory`` on the controller's topic, which it executes like
``joint_trajectory_controller`` (:class:`vqbet_core.sim.robot.SimRobot`: Jazzy's spline interpolation - cubic
with the points' velocities, linear without -, each trajectory replaces the running one, hold at the end). Teleop targets (``sensor_msgs/JointState``) go in the
same way, as one-point trajectories. The env steps once per control tick.

Time: ticks run on the absolute grid of the node clock (multiples of ``1/control_hz``, the grid
``recorder_node`` samples on); each tick steps the env with the target
commanded at the tick's grid time and stamps everything it then publishes with that time. A policy
that answers an observation stamped ``t`` with a chunk whose first point is due at ``t + 1/control_hz``
(the policy node's convention) therefore gets exactly the step ``vqbet sim-demos`` recorded: the first
tick of an episode publishes the reset observation, every later one steps the env once. A tick
the timer misses (an overloaded machine) is not made up: simulated time then runs slower than the
clock, and ``missed_ticks`` in ``/diagnostics`` counts it.

Lockstep (``lockstep: true``, ROS time): the node owns the clock. It publishes ``/clock`` (simulated time, one
period per tick) and, while an episode runs, takes the next tick only when a command covering it has
arrived (a trajectory whose last point is at or after the tick's time), or after ``lockstep_timeout`` s of
waiting (counted: ``lockstep_timeouts``; after one the ticks run free until commands come again);
otherwise ticks are paced at real time. An episode's first step
waits for the first command without a limit: until then every tick publishes the reset observation again,
as an offline rollout starts from it, and that first command runs from the next tick even when it answered an
earlier copy. A policy node on
``use_sim_time: true`` then never sees a late tick: a slow inference stretches the clock instead of dropping
a step, so a rollout over ROS is step for step what ``vqbet eval`` does offline on a slow machine too - the
way to measure the deployment's parity without a fast computer. On a real robot time is real: leave it off.

Interfaces (topics are parameters, and remappable):
  out  ``/joint_states`` (JointState, every tick), camera images (Image rgb8, ``camera_topic``, at ``camera_hz``,
       when the env has cameras), ``/sim/state`` (Float64MultiArray, every tick: :data:`STATE_HEADER` then the
       env's low-dim observation keys concatenated - what ``scripted_teleop_node`` acts on),
       ``/sim/episode_result`` (String, JSON, when an episode ends; reliable + transient local), ``/sim/subtasks``
       (String, JSON ``{episode, seed, step, stamp, completed, new}`` each tick a long-horizon env reports a subtask
       complete: the ground truth, for evaluation and an oracle mode only - a policy must never need it),
       ``/diagnostics``
  in   ``/arm_controller/joint_trajectory`` (JointTrajectory, joints by name), ``/teleop/joint_command``
       (JointState position targets, by name)
  srv  ``~/reset`` (std_srvs/Trigger: start a new episode with the next seed; commands stamped before it are
       ignored, so a trajectory still in flight from the last episode cannot move the reset robot)

Run: ``ros2 run vqbet_ros sim_robot_node --ros-args --params-file config/sim.yaml`` or, on the command line,
``python -m vqbet_ros.sim_robot_node --ros-args -p env:=blockpush -p "env_args:='{action_mode: target, image_size: 96}'"``
(the inner quotes make the mapping a YAML *string*, which is what the parameter holds).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from vqbet_core.errors import VqbetError
from vqbet_core.sim.robot import SimRobot, TrajectoryRejected, motion_metrics
from vqbet_ros import ros_convert
from vqbet_ros.diagnostics import Diagnostics
from vqbet_ros.params import declare as declare_parameter
from vqbet_ros.qos import qos_from_parameters
from vqbet_ros.sim_state import STATE_HEADER, lowdim_vector, make_sim_env, parse_env_args


def _stamp_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


class SimRobotNode(Node):
    def __init__(self, **kwargs):
        super().__init__("sim_robot_node", **kwargs)
        p = self.p = self._declare_parameters()
        if p["control_hz"] < 0 or p["camera_hz"] < 0:
            raise VqbetError(f"parameters control_hz ({p['control_hz']}) and camera_hz ({p['camera_hz']}) must be "
                             ">= 0 (0 = the env's rate / every control tick)")
        if p["seed"] < 0:
            raise VqbetError(f"parameter seed must be >= 0, got {p['seed']}")
        self.env_args = parse_env_args(p["env_args"])
        self.env = make_sim_env(p["env"], self.env_args, p["control_hz"])
        self.robot = SimRobot(self.env)
        self.control_hz = self.robot.control_hz
        self.period = 1.0 / self.control_hz
        self.camera_period = 1.0 / p["camera_hz"] if p["camera_hz"] else 0.0
        self.cameras = [k[len("camera_"):] for k in self.env.image_keys]
        topic = p["camera_topic"]
        if len(self.cameras) > 1 and "{name}" not in topic:
            raise VqbetError(f"parameter camera_topic {topic!r} must contain '{{name}}': env '{p['env']}' has "
                             f"cameras {self.cameras}")
        self.camera_topics = {c: topic.replace("{name}", c) for c in self.cameras}

        # episode state
        self.episode = -1
        self.episode_seed = int(p["seed"])
        self.started = False  # the current episode has run (an idle one is started by ~/reset as it is)
        self.fresh = True
        self.episode_start = 0  # ns; commands stamped earlier belong to an earlier episode
        self.running = False
        self.result_sent = True
        self.period_ns = int(round(1e9 / self.control_hz))
        self.last_grid = -1
        self.last_camera = -np.inf
        self.prev_q: np.ndarray | None = None
        self.counts = {"ticks": 0, "steps": 0, "trajectories": 0, "teleop_commands": 0, "rejected": 0,
                       "skipped_ticks": 0, "missed_ticks": 0, "stale_commands": 0,
                       "episodes": 0, "lockstep_waits": 0, "lockstep_timeouts": 0, "lockstep_superseded": 0}
        # lockstep: simulated time (ns, the last tick's), the wall time the next tick may come, the end of
        # the commands received (s, simulated), and when the running tick started waiting for one
        self.lockstep = bool(p["lockstep"])
        if self.lockstep and p["lockstep_timeout"] <= 0:
            raise VqbetError(f"parameter lockstep_timeout must be > 0 s, got {p['lockstep_timeout']}")
        self.sim_ns = round(self.get_clock().now().nanoseconds / self.period_ns) * self.period_ns
        self.next_wall = 0.0
        self.commanded_until = -np.inf
        self.waiting_since: float | None = None
        self.last_rejection = ""

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.joint_pub = self.create_publisher(JointState, p["joint_states_topic"], reliable)
        image_qos = qos_from_parameters(self, "image_qos", "reliable", 5)
        self.image_pubs = {c: self.create_publisher(Image, t, image_qos) for c, t in self.camera_topics.items()}
        self.state_pub = self.create_publisher(Float64MultiArray, p["state_topic"], reliable)
        self.result_pub = self.create_publisher(String, p["result_topic"], QoSProfile(
            depth=20, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.subtask_pub = self.create_publisher(String, p["subtasks_topic"], QoSProfile(
            depth=20, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.n_completed = 0
        self.create_subscription(JointTrajectory, p["trajectory_topic"], self._on_trajectory, reliable)
        self.create_subscription(JointState, p["teleop_topic"], self._on_teleop, reliable)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.diagnostics = Diagnostics(self, "sim_robot", hardware_id=f"sim:{p['env']}")
        if self.lockstep:
            self.clock_pub = self.create_publisher(Clock, "/clock", 10)
        # lockstep checks four times a period whether the next tick may come (its command may arrive any time)
        self.create_timer(self.period / 4 if self.lockstep else self.period, self._on_tick)
        self.create_timer(float(p["diagnostics_period"]), self._publish_diagnostics)

        self._reset(start=bool(p["autostart"]))
        self.get_logger().info(
            f"env {p['env']} {self.env_args} at {self.control_hz:g} Hz, joints {self.robot.joint_names}, cameras "
            f"{self.camera_topics or 'none'}; commands on {p['trajectory_topic']} and {p['teleop_topic']}; "
            + ("episode 0 running" if self.running else "idle: call ~/reset to start an episode"))

    def _declare_parameters(self) -> dict:
        def declare(name, default, description):
            return declare_parameter(self, name, default, description)  # a wrong type: one line, exit 2

        return {
            "env": declare("env", "blockpush", "simulated env (vqbet_core.sim), e.g. blockpush"),
            "env_args": declare("env_args", "", "env constructor arguments as a YAML mapping, e.g. "
                                "'{action_mode: target, image_size: 96}'"),
            "seed": declare("seed", 0, "env seed of the first episode; each ~/reset uses the next one"),
            "control_hz": declare("control_hz", 0.0, "control ticks per second (one env step each); 0 = the env's"),
            "camera_hz": declare("camera_hz", 0.0, "camera frames per second; 0 = one per control tick"),
            "autostart": declare("autostart", True, "run the first episode at start (else idle until ~/reset)"),
            "auto_reset": declare("auto_reset", False, "start the next episode as soon as one ends"),
            "joint_states_topic": declare("joint_states_topic", "/joint_states", "measured joint states out"),
            "camera_topic": declare("camera_topic", "/camera/image_raw", "camera topic; '{name}' = camera name"),
            "trajectory_topic": declare("trajectory_topic", "/arm_controller/joint_trajectory",
                                        "controller command in (JointTrajectory)"),
            "teleop_topic": declare("teleop_topic", "/teleop/joint_command", "teleop joint targets in (JointState)"),
            "state_topic": declare("state_topic", "/sim/state", "full env state out (Float64MultiArray)"),
            "result_topic": declare("result_topic", "/sim/episode_result", "episode outcome out (String, JSON)"),
            "subtasks_topic": declare("subtasks_topic", "/sim/subtasks",
                                      "ground-truth subtask completions out (String, JSON; evaluation only)"),
            "frame_id": declare("frame_id", "", "header.frame_id of the images"),
            "lockstep": declare("lockstep", False, "publish /clock and let each running tick wait for the "
                                "command covering it (policy nodes on use_sim_time: no late ticks)"),
            "lockstep_timeout": declare("lockstep_timeout", 2.0, "s a lockstep tick waits for its command "
                                        "before it steps without one"),
            "diagnostics_period": declare("diagnostics_period", 1.0, "seconds between /diagnostics messages"),
        }

    # -------------------------------------------------------------- time
    def _now(self) -> float:
        if self.lockstep:
            return self.sim_ns * 1e-9
        return self.get_clock().now().nanoseconds * 1e-9

    def _grid_ns(self) -> int:
        """The tick's time on the absolute control grid (multiples of the period, timer jitter removed): the
        same grid ``recorder_node`` samples on, so recorded steps and simulator ticks coincide exactly.
        Lockstep: the next period of simulated time."""
        if self.lockstep:
            return self.sim_ns + self.period_ns
        return round(self.get_clock().now().nanoseconds / self.period_ns) * self.period_ns

    def _lockstep_ready(self) -> bool:
        """Lockstep: may the next tick come now? Real-time pacing, and a running episode's step waits for
        the command that covers it (up to ``lockstep_timeout`` s)."""
        wall = time.monotonic()
        if wall < self.next_wall:
            return False
        # a running episode whose last tick had a command (the stream is live: a controller that stopped,
        # e.g. a policy that finished its sequence, costs one timeout, then the ticks run free)
        if (self.running and not self.robot.done and not self.fresh and self.robot.steps > 0
                and self.commanded_until >= self.sim_ns * 1e-9 - 1e-6):
            t_next = (self.sim_ns + self.period_ns) * 1e-9
            if self.commanded_until < t_next - 1e-6:
                if self.waiting_since is None:
                    self.waiting_since = wall
                    self.counts["lockstep_waits"] += 1
                if wall - self.waiting_since < self.p["lockstep_timeout"]:
                    return False
                self.counts["lockstep_timeouts"] += 1
        self.waiting_since = None
        self.next_wall = wall + self.period
        return True

    # -------------------------------------------------------------- episodes
    def _reset(self, start: bool = True) -> None:
        """Next episode with the next seed; an episode that never ran (idle at start) is started as it is."""
        if self.episode < 0:
            self.episode = 0
        elif self.started:
            self.episode += 1
            self.episode_seed += 1
        self.started = start
        self.robot.reset(seed=self.episode_seed)
        self.fresh = True  # the first tick publishes the reset observation; the env steps from the next one
        self.episode_start = self.sim_ns if self.lockstep else self.get_clock().now().nanoseconds
        self.commanded_until = -np.inf
        self.prev_q = None
        self.n_completed = 0
        self.running = start
        self.result_sent = not start
        if start:
            self.counts["episodes"] += 1

    def _on_reset(self, request, response):
        try:
            old = (self.episode, self.robot.steps) if self.running and not self.robot.done else None
            self._reset(start=True)
            response.success = True
            response.message = json.dumps({"episode": self.episode, "seed": self.episode_seed,
                                           "start": self.episode_start * 1e-9})
            note = f" (episode {old[0]} abandoned after {old[1]} steps)" if old else ""
            self.get_logger().info(f"~/reset: episode {self.episode} started, seed {self.episode_seed}{note}")
        except Exception as exc:  # noqa: BLE001 - a service call must always get an answer
            response.success, response.message = False, f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"~/reset failed: {response.message}")
        return response

    def _episode_result(self, stamp: float) -> None:
        r = self.robot.result()
        data = {"episode": self.episode, "seed": self.episode_seed, "success": bool(r.success), "mode": r.mode,
                "length": int(r.length), "info": r.info, "stamp": stamp, "env": self.p["env"],
                # smoothness of what the controller commanded (velocity jumps, jerk at chunk boundaries)
                "motion": motion_metrics(np.array(self.robot.commanded_log), self.period)}
        self.result_pub.publish(String(data=json.dumps(data, default=_json_default)))
        self.result_sent = True
        self.get_logger().info(f"episode {self.episode} ended: success {r.success}, mode {r.mode}, "
                               f"{r.length} steps")

    # -------------------------------------------------------------- commands
    def _stale(self, stamp) -> bool:
        """A command stamped before the episode began answers the previous episode (e.g. a policy's hold
        trajectory still in flight when ~/reset came): it must not move the freshly reset robot."""
        ns = stamp.sec * 1_000_000_000 + stamp.nanosec
        if ns and ns < self.episode_start:
            self.counts["stale_commands"] += 1
            return True
        return False

    def _on_trajectory(self, msg) -> None:
        self.counts["trajectories"] += 1
        now = self._now()
        if self._stale(msg.header.stamp):
            return
        start = _stamp_s(msg.header.stamp) or now  # a zero stamp means "start now", as in the controller
        times = [start + p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
        if self.lockstep and self.running and self.robot.steps == 0 and times and times[0] < now + self.period - 1e-6:
            # lockstep, the episode's first command: the reset observation was published again while the
            # policy computed, so the answer to an earlier copy is behind the clock; it is the first action
            # all the same (offline, the env waits for it): it runs from the next tick
            shift = now + self.period - times[0]
            times = [t + shift for t in times]
        elif self.lockstep and times and max(times) < now + 1e-6:
            # lockstep: the answer to an observation the clock has moved past (repeated reset observations
            # all get answers) - superseded by the command that moved it, not an error
            self.counts["lockstep_superseded"] += 1
            return
        positions = [list(p.positions) for p in msg.points]
        # velocities on every point: cubic splines, as joint_trajectory_controller does; else linear
        with_vel = msg.points and all(len(p.velocities) == len(msg.joint_names) for p in msg.points)
        velocities = [list(p.velocities) for p in msg.points] if with_vel else None
        try:
            self.robot.set_trajectory(msg.joint_names, times, positions, now, velocities=velocities)
            self.commanded_until = max(times) if times else self.commanded_until
        except (TrajectoryRejected, ValueError) as exc:
            self._rejected("trajectory", exc)

    def _on_teleop(self, msg) -> None:
        self.counts["teleop_commands"] += 1
        if self._stale(msg.header.stamp):
            return
        try:
            if len(msg.name) != len(msg.position):
                raise TrajectoryRejected(f"{len(msg.name)} names but {len(msg.position)} positions")
            self.robot.set_target(msg.name, [list(msg.position)], self._now())
            self.commanded_until = np.inf  # a teleop target holds until the next one
        except (TrajectoryRejected, ValueError) as exc:
            self._rejected("teleop command", exc)

    def _rejected(self, what: str, exc: Exception) -> None:
        self.counts["rejected"] += 1
        self.last_rejection = f"{what}: {exc}"
        self.get_logger().warning(f"rejected a {what}: {exc}", throttle_duration_sec=5.0)

    # -------------------------------------------------------------- control tick
    def _on_tick(self) -> None:
        try:
            if self.lockstep and not self._lockstep_ready():
                return
            self._tick()
        except Exception as exc:  # noqa: BLE001 - a sim error must not kill the robot silently
            self.get_logger().error(f"tick failed: {type(exc).__name__}: {exc}", throttle_duration_sec=5.0)

    def _tick(self) -> None:
        stamp_ns = self._grid_ns()
        if stamp_ns <= self.last_grid:  # a late timer call followed by an early one: same grid slot
            self.counts["skipped_ticks"] += 1
            return
        if self.last_grid > 0 and stamp_ns - self.last_grid > self.period_ns:
            self.counts["missed_ticks"] += (stamp_ns - self.last_grid) // self.period_ns - 1
        self.last_grid = stamp_ns
        if stamp_ns < self.episode_start:  # a late tick of a slot before the reset: the episode starts at the next
            self.counts["skipped_ticks"] += 1
            return
        t = stamp_ns * 1e-9
        self.counts["ticks"] += 1
        if self.lockstep:  # the clock first: a node on use_sim_time then sees this tick's messages as current
            self.sim_ns = stamp_ns
            msg = Clock()
            msg.clock.sec, msg.clock.nanosec = stamp_ns // 1_000_000_000, stamp_ns % 1_000_000_000
            self.clock_pub.publish(msg)
        if self.running and not self.robot.done:
            if self.fresh:
                self.fresh = False
            elif self.lockstep and self.robot.steps == 0 and self.commanded_until < t - 1e-6:
                pass  # lockstep: the env waits for the policy's first command (the reset observation again)
            else:
                self.robot.tick(t)
                self.counts["steps"] += 1
                self._publish_subtasks(t)
        q = self.robot.joint_positions()
        js = ros_convert.joint_state(self.robot.joint_names, q, stamp_ns)
        js.velocity = ((q - self.prev_q) * self.control_hz if self.prev_q is not None else np.zeros_like(q)).tolist()
        js.effort = [0.0] * len(q)
        self.prev_q = q
        self.joint_pub.publish(js)
        obs = self.robot.obs
        state = lowdim_vector(obs, self.env.obs_keys)
        header = [self.episode, self.episode_seed, self.robot.steps, float(self.running and not self.robot.done),
                  stamp_ns // 1_000_000_000, stamp_ns % 1_000_000_000]
        msg = Float64MultiArray(data=[float(v) for v in header] + state.tolist())
        msg.layout.dim = [MultiArrayDimension(label=",".join(STATE_HEADER) + ",state", size=len(msg.data),
                                              stride=len(msg.data))]
        self.state_pub.publish(msg)
        if self.cameras and (not self.camera_period or t - self.last_camera >= self.camera_period - 1e-6):
            self.last_camera = t
            for name in self.cameras:
                self.image_pubs[name].publish(ros_convert.rgb_to_image(obs[f"camera_{name}"], stamp_ns, "rgb8",
                                                                       self.p["frame_id"]))
        if self.running and self.robot.done and not self.result_sent:
            self._episode_result(t)
            if self.p["auto_reset"]:
                self._reset(start=True)

    def _publish_subtasks(self, stamp: float) -> None:
        completed = list(self.env.completed)
        if len(completed) > self.n_completed:
            data = {"episode": self.episode, "seed": self.episode_seed, "step": self.robot.steps, "stamp": stamp,
                    "completed": completed, "new": completed[self.n_completed:]}
            self.n_completed = len(completed)
            self.subtask_pub.publish(String(data=json.dumps(data)))

    def _publish_diagnostics(self) -> None:
        values = {"episode": self.episode, "seed": self.episode_seed, "running": self.running and not self.robot.done,
                  "episode_steps": self.robot.steps, "control_hz": self.control_hz, **self.counts,
                  "controller_rejected": self.robot.rejected, "last_rejection": self.last_rejection}
        level = "warn" if self.last_rejection and self.counts["rejected"] else "ok"
        state = "running" if self.running and not self.robot.done else ("episode done" if self.running else "idle")
        self.diagnostics.publish(level, state, values)

    def finish(self) -> None:
        self.env.close()


def _json_default(value):
    """numpy scalars / arrays in env info dicts -> JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def main(args=None) -> int:
    from vqbet_ros.node_main import run_node

    return run_node("sim_robot_node", SimRobotNode, args, cleanup=lambda node: node.finish())


if __name__ == "__main__":
    sys.exit(main())
