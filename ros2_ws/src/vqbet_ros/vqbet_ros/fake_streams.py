"""fake_streams: a deterministic robot + teleop publisher, for recorder tests and benchmarks.

Why: the recorder must be tested over real DDS against what was actually published. Every message's
content is a pure function of its sequence number (:func:`joint_values`, :func:`command_values`,
:func:`frame`), and ``--log`` writes one JSON line per message (stream, seq, header stamp, bad), so a
test can compute exactly what the recorder should have stored at each tick. ``--shuffle`` publishes
joint names in a new random order every message, ``--bad-every N`` makes every N-th message malformed.

Run: ``python -m vqbet_ros.fake_streams --joints j1,j2 --camera front:/camera/image_raw:bgr8:64x48 --log pub.jsonl``
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

COMPRESSED = ("png", "jpeg")


# ---------------------------------------------------------------------- content (no ROS)
def joint_values(seq: int, n: int) -> np.ndarray:
    """Measured positions of message ``seq``, in calibration order (exact in float32 up to seq 2**22)."""
    return (seq * 0.5 + np.arange(n)).astype(np.float32)


def command_values(seq: int, n: int) -> np.ndarray:
    return (-seq * 0.25 - np.arange(n)).astype(np.float32)


def frame(seq: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 frame of message ``seq``: a gradient that moves with ``seq``."""
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 3 + y * 5)[..., None] + np.array([0, 70, 140])
    return ((base + seq) % 256).astype(np.uint8)


def parse_camera(spec: str) -> tuple[str, str, str, int, int]:
    """``NAME:TOPIC:ENCODING:WxH`` (encoding rgb8, bgr8, mono8, rgba8, bgra8, png or jpeg)."""
    try:
        name, topic, encoding, size = spec.split(":")
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--camera {spec!r}: expected NAME:TOPIC:ENCODING:WxH") from None
    return name, topic, encoding, w, h


# ---------------------------------------------------------------------- node
def main(argv=None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node
    from rclpy.utilities import remove_ros_args
    from sensor_msgs.msg import CompressedImage, Image, JointState
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    from vqbet_ros import ros_convert
    from vqbet_ros.qos import make_qos

    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(prog="fake_streams", description=__doc__.splitlines()[0])
    parser.add_argument("--joints", required=True, help="comma-separated joint names, in calibration order")
    parser.add_argument("--camera", action="append", default=[], help="NAME:TOPIC:ENCODING:WxH (repeatable)")
    parser.add_argument("--camera-hz", type=float, default=30.0)
    parser.add_argument("--joint-topic", default="/joint_states")
    parser.add_argument("--joint-hz", type=float, default=100.0)
    parser.add_argument("--command-topic", default="/teleop/joint_command")
    parser.add_argument("--command-hz", type=float, default=30.0)
    parser.add_argument("--command-type", choices=("JointState", "JointTrajectory"), default="JointState")
    parser.add_argument("--shuffle", action="store_true", help="new joint name order in every message")
    parser.add_argument("--bad-every", type=int, default=0, help="every N-th message of each stream is malformed")
    parser.add_argument("--frames", type=int, default=0, help="cycle N precomputed frames (fast, for benchmarks)")
    parser.add_argument("--reliability", choices=("reliable", "best_effort"), default="reliable", help="of the cameras")
    parser.add_argument("--state-reliability", choices=("reliable", "best_effort"), default="reliable",
                        help="of joint states and the teleop command")
    parser.add_argument("--depth", type=int, default=100, help="publisher history depth (slow readers lose less)")
    parser.add_argument("--log", default=None, help="JSON lines: one per published message")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds to run (0 = until stopped)")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(remove_ros_args(argv)[1:])

    names = opts.joints.split(",")
    cams = [parse_camera(c) for c in opts.camera]
    rng = np.random.default_rng(opts.seed)
    log = open(opts.log, "w") if opts.log else None
    qos = make_qos(opts.reliability, opts.depth)
    state_qos = make_qos(opts.state_reliability, opts.depth)

    rclpy.init(args=argv)
    node = Node("fake_streams")
    clock = node.get_clock()
    counters: dict[str, int] = {}

    def record(stream: str, seq: int, stamp: int, bad: bool) -> None:
        if log is not None:
            log.write(json.dumps({"s": stream, "k": seq, "t": stamp, "bad": bad}) + "\n")

    def next_seq(stream: str) -> tuple[int, bool]:
        seq = counters.get(stream, 0)
        counters[stream] = seq + 1
        return seq, bool(opts.bad_every) and seq % opts.bad_every == opts.bad_every - 1

    def order() -> np.ndarray:
        return rng.permutation(len(names)) if opts.shuffle else np.arange(len(names))

    def joint_message(values: np.ndarray, bad: bool, seq: int, stamp: int):
        perm = order()
        msg = ros_convert.joint_state([names[i] for i in perm], values[perm], stamp)
        if bad:  # cycle through the kinds of malformed joint messages
            kind = (seq // max(opts.bad_every, 1)) % 3
            if kind == 0:
                msg.position = [float("nan")] + list(msg.position[1:])
            elif kind == 1:
                msg.position = list(msg.position[:-1])
            else:
                msg.name = list(msg.name[:-1])
                msg.position = list(msg.position[:-1])
        return msg

    js_pub = node.create_publisher(JointState, opts.joint_topic, state_qos)

    def on_joint() -> None:
        seq, bad = next_seq("robot_joint")
        stamp = clock.now().nanoseconds
        js_pub.publish(joint_message(joint_values(seq, len(names)), bad, seq, stamp))
        record("robot_joint", seq, stamp, bad)

    cmd_type = JointTrajectory if opts.command_type == "JointTrajectory" else JointState
    cmd_pub = node.create_publisher(cmd_type, opts.command_topic, state_qos)

    def on_command() -> None:
        seq, bad = next_seq("action")
        stamp = clock.now().nanoseconds
        values = command_values(seq, len(names))
        if bad:
            values = values.copy()
            values[-1] = np.nan
        if cmd_type is JointState:
            msg = joint_message(values, False, seq, stamp)
        else:
            perm = order()
            msg = JointTrajectory(joint_names=[names[i] for i in perm],
                                  points=[JointTrajectoryPoint(positions=[float(v) for v in values[perm]])])
            msg.header.stamp = ros_convert.ns_to_time(stamp)
        cmd_pub.publish(msg)
        record("action", seq, stamp, bad)

    for name, topic, encoding, w, h in cams:
        compressed = encoding in COMPRESSED
        pub = node.create_publisher(CompressedImage if compressed else Image, topic, qos)
        cache = {}

        def make(seq, stamp, encoding=encoding, w=w, h=h, compressed=compressed):
            key = seq % opts.frames if opts.frames else seq
            rgb = cache.get(key)
            if rgb is None:
                rgb = frame(key, w, h)
                if opts.frames:
                    cache[key] = rgb
            if compressed:
                return ros_convert.rgb_to_compressed(rgb, stamp, encoding)
            if encoding in ("rgba8", "bgra8"):
                rgba = np.concatenate([rgb if encoding == "rgba8" else rgb[:, :, ::-1],
                                       np.full((h, w, 1), 255, np.uint8)], axis=2)
                msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=4 * w)
                msg.header.stamp = ros_convert.ns_to_time(stamp)
                msg.data = np.ascontiguousarray(rgba).tobytes()
                return msg
            return ros_convert.rgb_to_image(rgb, stamp, encoding)

        def on_camera(pub=pub, make=make, stream=f"camera_{name}", compressed=compressed) -> None:
            seq, bad = next_seq(stream)
            stamp = clock.now().nanoseconds
            msg = make(seq, stamp)
            if bad:
                if compressed:
                    msg.data = b"\x00not an image"
                else:
                    msg.data = bytes(msg.data)[: len(msg.data) // 2]
            pub.publish(msg)
            record(stream, seq, stamp, bad)

        node.create_timer(1.0 / opts.camera_hz, on_camera)
    node.create_timer(1.0 / opts.joint_hz, on_joint)
    node.create_timer(1.0 / opts.command_hz, on_command)
    if log is not None:
        node.create_timer(0.5, log.flush)
    end = None if opts.duration <= 0 else clock.now().nanoseconds + int(opts.duration * 1e9)
    try:
        while rclpy.ok() and (end is None or clock.now().nanoseconds < end):
            rclpy.spin_once(node, timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if log is not None:
            log.close()
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
