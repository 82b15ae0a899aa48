"""``SimRobot``: a simulated env driven like an arm under ``joint_trajectory_controller``, without ROS.

Why emulate the controller: the policy node's contract is the controller's (DESIGN.md section 5): it
publishes whole chunks as trajectories with absolute point times, and each new trajectory *replaces*
the running one, without blending. So the simulated robot must move the way ROS 2 Jazzy's
``joint_trajectory_controller`` (spline interpolation, ``open_loop_control: true``) moves the arm, or
what works in simulation would not be what runs on the arm:

- a trajectory is a list of joint-position points (optionally with velocities) at absolute times,
  joints named in any order; a trajectory that ends in the past is rejected;
- on arrival the controller notes the state it is commanding now (position and velocity: the
  "point before the trajectory"); until the first point's time it follows a spline from that state to
  the first point; after that it samples the trajectory's own points at the current time, so a
  trajectory whose first points are already in the past is joined where it is *now* (its path, not the
  old command: a late trajectory makes the target jump);
- between two points: a cubic Hermite spline when both have velocities (continuous velocity), linear
  otherwise (positions only: continuous position, velocity jumps at the points) - Jazzy's "splines";
- after the last point the robot holds its position (velocity 0);
- at every control tick the target sampled at that time goes to the env (``SimEnv.step_joints``), and
  the commanded position is recorded, so the motion executed at chunk boundaries can be measured
  (:func:`motion_metrics`: velocity jumps, peak jerk).

Teleoperation commands (a single target, "go there now") are held from the next tick.
``sim_robot_node`` wraps this class with ROS topics; tests drive it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vqbet_core.errors import VqbetError
from vqbet_core.sim.base import SimEnv


class TrajectoryRejected(VqbetError):
    """A trajectory the controller would refuse (unknown joints, bad shapes, non-finite values, in the past)."""


@dataclass
class _Segment:
    times: np.ndarray  # (P,) strictly increasing absolute seconds
    positions: np.ndarray  # (P, J) in the env's joint order
    velocities: np.ndarray | None  # (P, J) or None (positions only: linear interpolation)
    t_before: float  # the "point before the trajectory": when it arrived ...
    p_before: np.ndarray  # ... the position commanded then ...
    v_before: np.ndarray  # ... and the velocity commanded then


def _hermite(t0, p0, v0, t1, p1, v1, t) -> tuple[np.ndarray, np.ndarray]:
    """Cubic Hermite spline between (t0, p0, v0) and (t1, p1, v1) at t: position and velocity."""
    h = t1 - t0
    s = (t - t0) / h
    s2, s3 = s * s, s * s * s
    pos = (2 * s3 - 3 * s2 + 1) * p0 + (s3 - 2 * s2 + s) * h * v0 + (-2 * s3 + 3 * s2) * p1 + (s3 - s2) * h * v1
    vel = ((6 * s2 - 6 * s) * p0 + (3 * s2 - 4 * s + 1) * h * v0 + (-6 * s2 + 6 * s) * p1 + (3 * s2 - 2 * s) * h * v1) / h
    return pos, vel


def _between(t0, p0, v0, t1, p1, v1, t) -> tuple[np.ndarray, np.ndarray]:
    """Jazzy's spline rule: cubic when both ends have velocities, else linear."""
    if v0 is not None and v1 is not None:
        return _hermite(t0, p0, v0, t1, p1, v1, t)
    w = (t - t0) / (t1 - t0)
    return (1.0 - w) * p0 + w * p1, (p1 - p0) / (t1 - t0)


def motion_metrics(positions: np.ndarray, period: float) -> dict:
    """Smoothness of a commanded joint path sampled once per tick ``(N, J)``: the largest tick-to-tick
    velocity jump (rad/s, any joint), and the peak and 99th-percentile jerk (rad/s^3), by finite differences."""
    q = np.asarray(positions, np.float64)
    if len(q) < 4:
        return {"ticks": int(len(q)), "max_velocity_jump": 0.0, "peak_jerk": 0.0, "p99_jerk": 0.0}
    vel = np.diff(q, axis=0) / period
    jump = np.abs(np.diff(vel, axis=0)).max(axis=1)
    jerk = np.abs(np.diff(q, n=3, axis=0)).max(axis=1) / period ** 3
    return {"ticks": int(len(q)), "max_velocity_jump": float(jump.max()), "mean_velocity_jump": float(jump.mean()),
            "peak_jerk": float(jerk.max()), "p99_jerk": float(np.percentile(jerk, 99))}


class SimRobot:
    """Holds a :class:`SimEnv` with a joint-space protocol and emulates a position trajectory controller.

    Times are the caller's clock in seconds (ROS time in ``sim_robot_node``); ``tick(now)`` is one env
    control step. The env is stepped only by ``tick``, so one tick = ``1 / control_hz`` of simulated time.
    """

    def __init__(self, env: SimEnv):
        names = list(getattr(env, "joint_names", []) or [])
        if not names:
            raise VqbetError(f"env '{env.name}' has no joint_names: it cannot be driven as a robot")
        cls = type(env)
        if cls.joint_positions is SimEnv.joint_positions or (
                cls.step_joints is SimEnv.step_joints and not getattr(env, "action_is_joint_target", False)):
            raise VqbetError(f"env '{env.name}' has joint_names but does not implement joint_positions() and "
                             "step_joints() (or a joint-target action): it cannot be driven as a robot")
        self.env = env
        self.joint_names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.control_hz = float(getattr(env, "control_hz", 0) or env.dataset_attrs().get("control_hz") or 10.0)
        self.obs: dict | None = None
        self.done = False
        self.steps = 0
        self.rejected = 0
        self.received = 0
        self._segment: _Segment | None = None
        self._hold = np.zeros(len(names))
        self.commanded_log: list[np.ndarray] = []  # the target sent at each tick of this episode

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int | None = None) -> dict:
        """New episode: no trajectory, hold where the joints are."""
        self.obs = self.env.reset(seed=seed)
        self.done = False
        self.steps = 0
        self._segment = None
        self._hold = np.asarray(self.env.joint_positions(), np.float64).copy()
        self.commanded_log = []
        return self.obs

    def joint_positions(self) -> np.ndarray:
        return np.asarray(self.env.joint_positions(), np.float64)

    # ------------------------------------------------------------------ commands
    def _order(self, joint_names, positions) -> np.ndarray:
        """Positions ``(P, len(joint_names))`` given by name -> ``(P, J)`` in the env's joint order."""
        names = list(joint_names)
        pos = np.asarray(positions, np.float64)
        if pos.ndim == 1:
            pos = pos[None]
        if len(set(names)) != len(names):
            raise TrajectoryRejected(f"joint names {names} have duplicates")
        unknown = [n for n in names if n not in self.index]
        missing = [n for n in self.joint_names if n not in names]
        if unknown or missing:
            raise TrajectoryRejected(f"joint names {names} do not match the robot's {self.joint_names}"
                                     f"{f' (unknown {unknown})' if unknown else ''}{f' (missing {missing})' if missing else ''}")
        if pos.ndim != 2 or pos.shape[1] != len(names):
            raise TrajectoryRejected(f"positions must be (points, {len(names)}) for joints {names}, got {tuple(pos.shape)}")
        if not np.all(np.isfinite(pos)):
            raise TrajectoryRejected("positions hold non-finite values")
        out = np.empty_like(pos)
        out[:, [self.index[n] for n in names]] = pos
        return out

    def commanded(self, now: float) -> np.ndarray:
        """The position target at time ``now`` (see the module docstring), else the held position."""
        return self.commanded_state(now)[0]

    def commanded_state(self, now: float) -> tuple[np.ndarray, np.ndarray]:
        """(position, velocity) the controller commands at ``now``."""
        seg = self._segment
        zero = np.zeros(len(self.joint_names))
        if seg is None:
            return self._hold.copy(), zero
        v = seg.velocities
        if now < seg.times[0]:  # from the state when the trajectory arrived to its first point
            if now <= seg.t_before:
                return seg.p_before.copy(), seg.v_before.copy()
            return _between(seg.t_before, seg.p_before, seg.v_before if v is not None else None,
                            seg.times[0], seg.positions[0], None if v is None else v[0], now)
        if now >= seg.times[-1]:
            return seg.positions[-1].copy(), zero
        k = int(np.searchsorted(seg.times, now, side="right"))  # seg.times[k-1] <= now < seg.times[k]
        return _between(seg.times[k - 1], seg.positions[k - 1], None if v is None else v[k - 1],
                        seg.times[k], seg.positions[k], None if v is None else v[k], now)

    def set_trajectory(self, joint_names, times, positions, now: float, velocities=None) -> int:
        """Replace the running trajectory (absolute ``times`` (P,), ``positions`` (P, len(joint_names)),
        optional ``velocities`` of the same shape: cubic splines instead of linear segments).

        An empty trajectory stops: hold the position commanded now. Returns how many points lie in the
        future. Raises :class:`TrajectoryRejected` (the running trajectory is kept) when the message is
        malformed or ends in the past.
        """
        self.received += 1
        try:
            t = np.asarray(times, np.float64).reshape(-1)
            if t.size == 0:
                self._hold = self.commanded(now)
                self._segment = None
                return 0
            pos = self._order(joint_names, positions)
            if pos.shape[0] != t.size:
                raise TrajectoryRejected(f"{t.size} point times but {pos.shape[0]} points")
            vel = None
            if velocities is not None and np.size(velocities):
                vel = self._order(joint_names, velocities)
                if vel.shape != pos.shape:
                    raise TrajectoryRejected(f"velocities must match the positions' shape {pos.shape}, got {vel.shape}")
            if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
                raise TrajectoryRejected("point times must be finite and strictly increasing")
            if t[-1] < now:
                raise TrajectoryRejected(f"trajectory ended {now - t[-1]:.3f} s before it arrived")
        except TrajectoryRejected:
            self.rejected += 1
            raise
        p_now, v_now = self.commanded_state(now)
        self._segment = _Segment(t, pos, vel, float(now), p_now, v_now)
        return int((t > now).sum())

    def set_target(self, joint_names, positions, now: float) -> None:
        """A teleop command: go to ``positions`` from the next tick on (a one-point trajectory at ``now``)."""
        self.received += 1
        try:
            pos = self._order(joint_names, positions)
        except TrajectoryRejected:
            self.rejected += 1
            raise
        if pos.shape[0] != 1:
            self.rejected += 1
            raise TrajectoryRejected(f"a joint target is one point, got {pos.shape[0]}")
        self._segment = None
        self._hold = pos[0].copy()

    # ------------------------------------------------------------------ control
    def tick(self, now: float) -> tuple[dict, bool]:
        """One control step: send the target commanded at ``now`` to the env. A finished episode is not stepped."""
        if self.obs is None:
            raise VqbetError("SimRobot.tick before reset(): start an episode first")
        if self.done:
            return self.obs, True
        target = self.commanded(now)
        self.commanded_log.append(target)
        self.obs, self.done = self.env.step_joints(target)
        self.steps += 1
        return self.obs, self.done

    def result(self):
        return self.env.result()
