"""``SimRobot``: a simulated env driven like an arm under ``joint_trajectory_controller``, without ROS.

Why emulate the controller: the policy node's contract is the controller's (DESIGN.md section 5): it
publishes whole chunks as trajectories with absolute point times, and each new trajectory *replaces*
the running one, without blending. So the simulated robot must behave the same way, or the loop
tested in simulation would not be the one that runs on the arm:

- a trajectory is a list of joint-position points at absolute times, with joints named (any order);
- a new one replaces the old: it starts from the position commanded at that moment and runs linearly
  in time to its first future point; points already in the past are skipped, and a trajectory that
  ends in the past is rejected (as the controller does);
- at every control tick the target interpolated at that time goes to the env (``SimEnv.step_joints``);
- when the trajectory has ended, or none was received, the robot holds the last commanded position.

Teleoperation commands (a single target, "go there now") are one-point trajectories at the tick time.
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

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int | None = None) -> dict:
        """New episode: no trajectory, hold where the joints are."""
        self.obs = self.env.reset(seed=seed)
        self.done = False
        self.steps = 0
        self._segment = None
        self._hold = np.asarray(self.env.joint_positions(), np.float64).copy()
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
        """The position target at time ``now``: linear in time along the running trajectory, else held."""
        seg = self._segment
        if seg is None:
            return self._hold.copy()
        if now >= seg.times[-1]:
            return seg.positions[-1].copy()
        if now <= seg.times[0]:
            return seg.positions[0].copy()
        k = int(np.searchsorted(seg.times, now, side="right"))  # seg.times[k-1] <= now < seg.times[k]
        t0, t1 = seg.times[k - 1], seg.times[k]
        w = (now - t0) / (t1 - t0)
        return (1.0 - w) * seg.positions[k - 1] + w * seg.positions[k]

    def set_trajectory(self, joint_names, times, positions, now: float) -> int:
        """Replace the running trajectory (absolute ``times`` (P,), ``positions`` (P, len(joint_names))).

        An empty trajectory stops: hold the position commanded now. Returns how many points were kept
        (future ones). Raises :class:`TrajectoryRejected` (the running trajectory is kept) when the
        message is malformed or ends in the past.
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
            if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
                raise TrajectoryRejected("point times must be finite and strictly increasing")
            if t[-1] < now:
                raise TrajectoryRejected(f"trajectory ended {now - t[-1]:.3f} s before it arrived")
        except TrajectoryRejected:
            self.rejected += 1
            raise
        future = t > now
        start = self.commanded(now)
        self._segment = _Segment(np.concatenate([[now], t[future]]), np.vstack([start[None], pos[future]]))
        if not future.any():  # last point exactly now: a hold there
            self._segment = None
            self._hold = pos[-1].copy()
        return int(future.sum())

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
        self.obs, self.done = self.env.step_joints(self.commanded(now))
        self.steps += 1
        return self.obs, self.done

    def result(self):
        return self.env.result()
