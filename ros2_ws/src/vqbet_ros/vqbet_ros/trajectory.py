"""Predicted action chunk -> safe ``trajectory_msgs/JointTrajectory`` for ``joint_trajectory_controller``.

Why a separate module: the safety math (joint-limit clamping, per-step velocity bounding, rejection of
non-finite outputs, velocities for spline interpolation) is plain numpy, so it is unit-tested without
ROS; only :func:`to_joint_trajectory` touches ROS message types (imported there, lazily).

Timing convention: action ``k`` of a chunk predicted from the observation taken at ``stamp`` is the
target of control step ``k`` and must be reached at the end of that step, ``times[k] + lead`` with
``lead`` = one control period. The message's ``header.stamp`` is the observation stamp and
``time_from_start`` is relative to it, so ``joint_trajectory_controller`` skips whatever part of the
chunk is already in the past when it arrives (latency compensation); :func:`make_safe_trajectory`
drops those points itself too, so the velocity bound is computed from where the arm is now.

Jazzy's controller rejects a trajectory whose last point has a non-zero velocity (unless
``allow_nonzero_velocity_at_trajectory_end``) and rejects empty trajectories, so the last point
always has zero velocity and a stop is commanded as a one-point "hold" trajectory, never an empty one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SafetyLimits:
    """Joint limits of the calibration, in calibration joint order."""

    lower: np.ndarray
    upper: np.ndarray
    max_velocity: np.ndarray  # per joint, rad/s (m/s for prismatic joints)

    def __post_init__(self):
        self.lower = np.asarray(self.lower, np.float64).reshape(-1)
        self.upper = np.asarray(self.upper, np.float64).reshape(-1)
        self.max_velocity = np.asarray(self.max_velocity, np.float64).reshape(-1)
        n = self.lower.size
        if self.upper.size != n or self.max_velocity.size != n:
            raise ValueError(f"joint limits have different lengths: lower {n}, upper {self.upper.size}, "
                             f"velocity {self.max_velocity.size}")
        if np.any(self.lower >= self.upper) or np.any(self.max_velocity <= 0):
            raise ValueError("joint limits need lower < upper and a positive velocity bound for every joint")

    @classmethod
    def from_calibration(cls, calib, velocity_scale: float = 1.0) -> "SafetyLimits":
        if not velocity_scale > 0:
            raise ValueError(f"velocity_scale must be > 0, got {velocity_scale}")
        return cls(calib.lower, calib.upper, np.asarray(calib.max_velocity, np.float64) * float(velocity_scale))


@dataclass
class SafeTrajectory:
    """What gets published: positions / velocities ``(P, J)`` at absolute ``times`` ``(P,)``."""

    positions: np.ndarray
    velocities: np.ndarray
    times: np.ndarray
    stamp: float  # header.stamp: the observation stamp the times are relative to
    clamped: int = 0  # joint values moved onto a position limit
    rate_limited: int = 0  # joint values held back by the velocity bound
    dropped_past: int = 0  # points already in the past when published
    tracking_limited: int = 0  # joints whose start was pulled back to max_tracking_error of the measured position
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.times.shape[0])

    def sample(self, t: float) -> np.ndarray:
        """Linear interpolation of the positions at time ``t`` (held at both ends)."""
        return np.array([np.interp(t, self.times, self.positions[:, j]) for j in range(self.positions.shape[1])])


class UnsafeOutput(ValueError):
    """The model produced something that must not be sent to the arm (non-finite values, wrong shape)."""


def check_finite(actions: np.ndarray, n_joints: int) -> np.ndarray:
    """Reject a chunk that is not ``(W, n_joints)`` or holds NaN / inf: returns it as float64."""
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != n_joints or a.shape[0] == 0:
        raise UnsafeOutput(f"action chunk must be (W, {n_joints}), got {tuple(a.shape)}")
    bad = ~np.isfinite(a)
    if bad.any():
        step, joint = (int(v) for v in np.argwhere(bad)[0])
        raise UnsafeOutput(f"action chunk has {int(bad.sum())} non-finite value(s) (first at step {step}, joint {joint})")
    return a


def clamp_positions(positions: np.ndarray, limits: SafetyLimits) -> tuple[np.ndarray, int]:
    """Clip to the joint limits; returns the clipped array and how many values were moved."""
    out = np.clip(positions, limits.lower, limits.upper)
    return out, int(np.count_nonzero(out != positions))


def bound_velocity(positions: np.ndarray, times: np.ndarray, start: np.ndarray, start_time: float,
                   max_velocity: np.ndarray) -> tuple[np.ndarray, int]:
    """Rate-limit a sequence of targets so no joint moves faster than ``max_velocity``.

    Point ``k`` may move at most ``max_velocity * (times[k] - times[k-1])`` from point ``k-1``; the
    point before the first is the measured position ``start`` at ``start_time``. Returns the limited
    positions and how many joint values were held back.
    """
    out = np.empty_like(positions, dtype=np.float64)
    prev, prev_t, limited = np.asarray(start, np.float64), float(start_time), 0
    for k in range(positions.shape[0]):
        step = max(float(times[k]) - prev_t, 0.0) * max_velocity
        delta = positions[k] - prev
        clipped = np.clip(delta, -step, step)
        limited += int(np.count_nonzero(np.abs(clipped - delta) > 1e-12))
        prev = prev + clipped
        out[k] = prev
        prev_t = float(times[k])
    return out, limited


def spline_velocities(positions: np.ndarray, times: np.ndarray, start: np.ndarray, start_time: float,
                      max_velocity: np.ndarray) -> np.ndarray:
    """Velocities for cubic interpolation: central differences, start point as the left neighbour, zero at the end."""
    p = np.vstack([np.asarray(start, np.float64)[None], positions])
    t = np.concatenate([[float(start_time)], np.asarray(times, np.float64)])
    v = np.zeros_like(positions, dtype=np.float64)
    dt = t[2:] - t[:-2]  # point k sits at index k+1 of p; its neighbours are k and k+2
    v[:-1] = (p[2:] - p[:-2]) / np.where(dt > 0, dt, np.inf)[:, None]
    return np.clip(v, -max_velocity, max_velocity)


def make_safe_trajectory(actions: np.ndarray, times: np.ndarray, stamp: float, current: np.ndarray, now: float,
                         limits: SafetyLimits, lead: float, commanded: np.ndarray | None = None,
                         max_tracking_error: float = 0.0) -> SafeTrajectory:
    """Blended chunk (joint targets at ``times``) -> clamped, velocity-bounded trajectory starting now.

    ``lead``: how long after its nominal time a target should be reached (one control period).
    The velocity bound applies to the *command*: it starts from ``commanded``, the position the controller is
    commanding now (the previous trajectory at ``now``), or from the measured ``current`` when nothing is being
    commanded. Why not always from the measured position: a position-controlled arm lags its target, and a
    target bounded against the measured position cannot lead it, so the arm moves slower and weaker than in the
    demonstrations (kitchen: 24-36 % of the demos' targets are further than one period's velocity bound from the
    measured joints). ``max_tracking_error`` > 0 keeps that start within this distance (rad, or m for prismatic
    joints) of the measured position, so a blocked arm's target cannot run away from it.
    Raises :class:`UnsafeOutput` for non-finite actions and when nothing of the chunk is left in the future.
    """
    a = check_finite(actions, limits.lower.size)
    t = np.asarray(times, np.float64).reshape(-1) + float(lead)
    if t.shape[0] != a.shape[0]:
        raise UnsafeOutput(f"chunk has {a.shape[0]} actions but {t.shape[0]} times")
    if np.any(np.diff(t) <= 0):
        raise UnsafeOutput("chunk times are not strictly increasing")
    current = np.asarray(current, np.float64).reshape(-1)
    if current.shape[0] != a.shape[1] or not np.all(np.isfinite(current)):
        raise UnsafeOutput(f"current joint positions must be {a.shape[1]} finite numbers")
    future = t > now
    dropped = int(np.count_nonzero(~future))
    if not future.any():
        raise UnsafeOutput(f"the whole chunk is in the past ({now - t[-1]:.3f} s late): inference is too slow")
    a, t = a[future], t[future]
    start, tracking = current, 0
    if commanded is not None:
        start = np.asarray(commanded, np.float64).reshape(-1)
        if start.shape != current.shape or not np.all(np.isfinite(start)):
            raise UnsafeOutput(f"commanded joint positions must be {current.shape[0]} finite numbers")
        if max_tracking_error > 0:
            near = np.clip(start, current - max_tracking_error, current + max_tracking_error)
            tracking = int(np.count_nonzero(near != start))
            start = near
    a, clamped = clamp_positions(a, limits)
    a, limited = bound_velocity(a, t, start, now, limits.max_velocity)
    a, _ = clamp_positions(a, limits)  # a start outside the limits must not leak through
    v = spline_velocities(a, t, start, now, limits.max_velocity)
    return SafeTrajectory(a, v, t, float(stamp), clamped, limited, dropped, tracking_limited=tracking)


def hold_trajectory(position: np.ndarray, now: float, settle: float, limits: SafetyLimits) -> SafeTrajectory:
    """One point at ``position`` (clamped), zero velocity, ``settle`` seconds from now: a controlled stop."""
    p, clamped = clamp_positions(np.asarray(position, np.float64).reshape(1, -1), limits)
    return SafeTrajectory(p, np.zeros_like(p), np.array([now + settle]), float(now), clamped)


def _time_parts(seconds: float) -> tuple[int, int]:
    """Seconds -> (sec, nanosec) as builtin_interfaces Time / Duration hold them."""
    sec = int(np.floor(seconds))
    return sec, min(int(round((seconds - sec) * 1e9)), 999_999_999)


def _point_times(traj: SafeTrajectory) -> list[tuple[int, int]]:
    return [_time_parts(max(float(traj.times[k] - traj.stamp), 0.0)) for k in range(len(traj))]


def to_joint_trajectory(traj: SafeTrajectory, joint_names: list[str], frame_id: str = ""):
    """:class:`SafeTrajectory` -> ``trajectory_msgs/JointTrajectory`` (header.stamp = ``traj.stamp``)."""
    from builtin_interfaces.msg import Duration, Time
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    msg = JointTrajectory()
    sec, nanosec = _time_parts(traj.stamp)
    msg.header.stamp = Time(sec=sec, nanosec=nanosec)
    msg.header.frame_id = frame_id
    msg.joint_names = list(joint_names)
    for k, (s, ns) in enumerate(_point_times(traj)):
        point = JointTrajectoryPoint()
        point.positions = traj.positions[k].tolist()
        point.velocities = traj.velocities[k].tolist()
        point.time_from_start = Duration(sec=s, nanosec=ns)
        msg.points.append(point)
    return msg


class _CdrWriter:
    """Little-endian plain CDR (XCDR1, what rmw_fastrtps sends); alignment counts from after the 4-byte
    encapsulation header."""

    def __init__(self):
        self.buf = bytearray(b"\x00\x01\x00\x00")

    def _align(self, n: int) -> None:
        self.buf += bytes(-(len(self.buf) - 4) % n)

    def u32(self, *values: int) -> None:
        self._align(4)
        self.buf += struct.pack(f"<{len(values)}I", *values)

    def time(self, sec: int, nanosec: int) -> None:
        self._align(4)
        self.buf += struct.pack("<iI", sec, nanosec)

    def string(self, text: str) -> None:
        data = text.encode("utf-8") + b"\x00"
        self.u32(len(data))
        self.buf += data

    def doubles(self, values: np.ndarray) -> None:
        self.u32(values.size)
        if values.size:
            self._align(8)
            self.buf += np.ascontiguousarray(values, "<f8").tobytes()


def serialize_joint_trajectory(traj: SafeTrajectory, joint_names: list[str], frame_id: str = "") -> bytes:
    """The serialized ``JointTrajectory`` of :func:`to_joint_trajectory` (tests check it deserializes to the
    same message; padding is zero here, uninitialised in rmw's own bytes).

    Why: the node publishes these bytes (``Publisher.publish`` takes serialized messages), skipping the
    Python message objects and rclpy's conversion of them - ~0.2 ms of every control step on a 2-core
    arm computer, in the latency between a camera frame and the command.
    """
    w = _CdrWriter()
    w.time(*_time_parts(traj.stamp))
    w.string(frame_id)
    w.u32(len(joint_names))
    for name in joint_names:
        w.string(name)
    w.u32(len(traj))
    for k, (s, ns) in enumerate(_point_times(traj)):
        w.doubles(traj.positions[k])
        w.doubles(traj.velocities[k])
        w.u32(0, 0)  # accelerations, effort: empty
        w.time(s, ns)
    return bytes(w.buf)


def from_joint_trajectory(msg) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`to_joint_trajectory` (for tests and benchmarks): stamp, times, positions, velocities."""
    stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
    times = np.array([stamp + p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points])
    pos = np.array([list(p.positions) for p in msg.points], np.float64)
    vel = np.array([list(p.velocities) for p in msg.points], np.float64)
    return stamp, times, pos, vel
