"""The ROS-free parts of policy_node: joint-state merging, the camera frame slot, CDR image parsing.

Why a module of its own: unit tests (and the benchmarks) import these without rclpy; policy_node.py holds
the rclpy node class around them.
"""

from __future__ import annotations

import numpy as np

from vqbet_core.recording.clock import behind_note

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


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")
