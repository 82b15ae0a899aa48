"""Safety math of the policy node (vqbet_ros.trajectory), without ROS: limits, velocity bound, NaNs, timing."""

from pathlib import Path

import numpy as np
import pytest

from vqbet_core.calibration import load_calibration
from vqbet_ros.trajectory import (SafetyLimits, UnsafeOutput, bound_velocity, check_finite, hold_trajectory,
                                  make_safe_trajectory, spline_velocities)

REPO = Path(__file__).resolve().parents[2]
CALIB = load_calibration(REPO / "calibration" / "franka_sim.yaml")
HZ = 10.0


@pytest.fixture
def limits():
    return SafetyLimits.from_calibration(CALIB)


def chunk(start, step, w=6, stamp=100.0):
    actions = np.asarray(start, np.float64)[None] + np.arange(w)[:, None] * np.asarray(step, np.float64)[None]
    return actions, stamp + np.arange(w) / HZ


def test_limits_from_calibration_and_scale():
    lim = SafetyLimits.from_calibration(CALIB, velocity_scale=0.5)
    np.testing.assert_allclose(lim.max_velocity, CALIB.max_velocity * 0.5)
    with pytest.raises(ValueError):
        SafetyLimits.from_calibration(CALIB, velocity_scale=0.0)
    with pytest.raises(ValueError):
        SafetyLimits([0, 0], [1, -1], [1, 1])


def test_targets_outside_limits_are_clamped(limits):
    mid = (limits.lower + limits.upper) / 2
    actions, times = chunk(mid, np.zeros(9))
    actions[:, 0] = 10.0  # far above panda0_joint1's upper limit
    actions[:, 3] = -10.0  # far below panda0_joint4's lower limit
    traj = make_safe_trajectory(actions, times, 100.0, mid, 100.0, SafetyLimits(limits.lower, limits.upper,
                                                                                   np.full(9, 1e3)), lead=0.1)
    assert np.all(traj.positions <= limits.upper + 1e-12) and np.all(traj.positions >= limits.lower - 1e-12)
    assert traj.positions[-1, 0] == pytest.approx(limits.upper[0])
    assert traj.positions[-1, 3] == pytest.approx(limits.lower[3])
    assert traj.clamped == 2 * len(actions)


def test_velocity_bound_holds_between_every_pair_of_points(limits):
    start = (limits.lower + limits.upper) / 2
    actions, times = chunk(start + 1.0, np.full(9, 0.5))  # a 1 rad jump, then 5 rad/s: far too fast
    traj = make_safe_trajectory(actions, times, 100.0, start, 100.02, limits, lead=1 / HZ)
    p = np.vstack([start[None], traj.positions])
    t = np.concatenate([[100.02], traj.times])
    speed = np.abs(np.diff(p, axis=0)) / np.diff(t)[:, None]
    assert np.all(speed <= limits.max_velocity[None] + 1e-9)
    assert traj.rate_limited > 0
    assert np.all(np.abs(traj.velocities) <= limits.max_velocity[None] + 1e-12)


def test_slow_chunk_passes_unchanged_with_spline_velocities(limits):
    start = (limits.lower + limits.upper) / 2
    step = np.full(9, 0.01)
    step[7:] = 0.001  # fingers: small, slow steps
    actions, times = chunk(start + step, step)
    traj = make_safe_trajectory(actions, times, 100.0, start, 100.0, limits, lead=1 / HZ)
    np.testing.assert_allclose(traj.positions, actions)
    assert traj.clamped == 0 and traj.rate_limited == 0 and traj.dropped_past == 0
    np.testing.assert_allclose(traj.times, times + 0.1)
    # constant velocity in the middle, zero at the end (Jazzy rejects a non-zero final velocity)
    np.testing.assert_allclose(traj.velocities[2], step * HZ, rtol=1e-6)
    assert np.all(traj.velocities[-1] == 0)


def test_the_velocity_bound_continues_the_command_not_the_lagging_arm(limits):
    """A position-controlled arm lags its target: bounded against the measured joints, a command that moves
    within the velocity limit would be held back every step (the kitchen demos' targets lead the joints by up
    to 1.8 rad). Bounded against the command being followed, it passes unchanged."""
    measured = (limits.lower + limits.upper) / 2
    commanded = measured + 0.3  # the target leads the arm by 0.3 rad / m
    commanded[7:] = np.clip(commanded[7:], limits.lower[7:], limits.upper[7:])
    step = limits.max_velocity / HZ * 0.5  # half the velocity bound per step
    actions, times = chunk(commanded + step, step, w=1)
    from_arm = make_safe_trajectory(actions, times, 100.0, measured, 100.0, limits, lead=1 / HZ)
    assert from_arm.rate_limited > 0  # the old rule: pulled back towards the arm
    followed = make_safe_trajectory(actions, times, 100.0, measured, 100.0, limits, lead=1 / HZ, commanded=commanded)
    np.testing.assert_allclose(followed.positions, np.clip(actions, limits.lower, limits.upper))
    assert followed.rate_limited == 0 and followed.tracking_limited == 0
    # a jump of the command is still bounded, from where the command is
    jump = make_safe_trajectory(commanded[None] + 1.0, times, 100.0, measured, 100.0, limits, lead=1 / HZ,
                                commanded=commanded)
    moved = np.abs(jump.positions[0] - np.clip(commanded, limits.lower, limits.upper))
    assert np.all(moved <= limits.max_velocity / HZ + 1e-9) and jump.rate_limited > 0


def test_max_tracking_error_keeps_a_blocked_arms_command_near_it(limits):
    measured = (limits.lower + limits.upper) / 2
    commanded = measured.copy()
    commanded[:7] += 1.0  # the arm is blocked, its command ran 1 rad ahead
    actions, times = chunk(commanded, np.zeros(9), w=1)
    traj = make_safe_trajectory(actions, times, 100.0, measured, 100.0, limits, lead=1 / HZ, commanded=commanded,
                                max_tracking_error=0.2)
    assert traj.tracking_limited == 7
    lead = traj.positions[0] - measured
    assert np.all(np.abs(lead) <= 0.2 + limits.max_velocity / HZ + 1e-9)  # start within 0.2, then one step's bound
    with pytest.raises(UnsafeOutput, match="commanded joint positions"):
        make_safe_trajectory(actions, times, 100.0, measured, 100.0, limits, lead=1 / HZ, commanded=np.full(9, np.nan))


def test_points_in_the_past_are_dropped(limits):
    start = (limits.lower + limits.upper) / 2
    actions, times = chunk(start, np.zeros(9), w=5)
    traj = make_safe_trajectory(actions, times, 100.0, start, 100.25, limits, lead=0.1)
    # times + lead = 100.1 .. 100.5; 100.1 and 100.2 have passed
    assert traj.dropped_past == 2 and len(traj) == 3
    assert np.all(traj.times > 100.25)
    with pytest.raises(UnsafeOutput, match="in the past"):
        make_safe_trajectory(actions, times, 100.0, start, 101.0, limits, lead=0.1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_outputs_are_rejected(limits, bad):
    actions, times = chunk(np.zeros(9), np.zeros(9))
    actions[3, 4] = bad
    with pytest.raises(UnsafeOutput, match="non-finite.*step 3, joint 4"):
        make_safe_trajectory(actions, times, 100.0, np.zeros(9), 100.0, limits, lead=0.1)


def test_wrong_shapes_and_bad_current_state_are_rejected(limits):
    with pytest.raises(UnsafeOutput, match=r"\(W, 9\)"):
        check_finite(np.zeros((4, 7)), 9)
    actions, times = chunk(np.zeros(9), np.zeros(9))
    with pytest.raises(UnsafeOutput, match="current joint"):
        make_safe_trajectory(actions, times, 100.0, np.full(9, np.nan), 100.0, limits, lead=0.1)
    with pytest.raises(UnsafeOutput, match="strictly increasing"):
        make_safe_trajectory(actions, np.full(len(times), 100.0), 100.0, np.zeros(9), 100.0, limits, lead=0.1)


def test_start_outside_limits_never_leaks(limits):
    start = limits.upper + 0.2  # measured beyond the soft limit
    actions, times = chunk(limits.upper + 0.5, np.zeros(9))
    traj = make_safe_trajectory(actions, times, 100.0, start, 100.0, limits, lead=0.1)
    assert np.all(traj.positions <= limits.upper + 1e-12)


def test_bound_velocity_and_spline_velocities_directly():
    pos = np.array([[1.0], [1.0], [1.0]])
    out, n = bound_velocity(pos, np.array([0.1, 0.2, 0.3]), np.zeros(1), 0.0, np.array([2.0]))
    np.testing.assert_allclose(out[:, 0], [0.2, 0.4, 0.6])
    assert n == 3
    v = spline_velocities(out, np.array([0.1, 0.2, 0.3]), np.zeros(1), 0.0, np.array([2.0]))
    np.testing.assert_allclose(v[:, 0], [2.0, 2.0, 0.0])


def test_hold_is_one_clamped_point_with_zero_velocity(limits):
    traj = hold_trajectory(limits.upper + 1, 50.0, 0.1, limits)
    assert len(traj) == 1 and traj.times[0] == pytest.approx(50.1) and traj.stamp == 50.0
    np.testing.assert_allclose(traj.positions[0], limits.upper)
    assert np.all(traj.velocities == 0)
    np.testing.assert_allclose(traj.sample(0.0), limits.upper)


def test_message_round_trip(limits):
    pytest.importorskip("trajectory_msgs")
    from vqbet_ros.trajectory import from_joint_trajectory, to_joint_trajectory

    start = (limits.lower + limits.upper) / 2
    actions, times = chunk(start, np.full(9, 0.001))
    traj = make_safe_trajectory(actions, times + 1.7e9, 1.7e9 + 100.0, start, 1.7e9 + 100.0, limits, lead=0.1)
    msg = to_joint_trajectory(traj, CALIB.joint_names)
    assert list(msg.joint_names) == CALIB.joint_names and len(msg.points) == len(actions)
    stamp, t, p, v = from_joint_trajectory(msg)
    assert stamp == pytest.approx(1.7e9 + 100.0)
    np.testing.assert_allclose(t, traj.times, atol=1e-6)
    np.testing.assert_allclose(p, traj.positions)
    np.testing.assert_allclose(v, traj.velocities)
    assert all(np.diff([pt.time_from_start.sec + pt.time_from_start.nanosec * 1e-9 for pt in msg.points]) > 0)


@pytest.mark.parametrize("frame_id,points", [("", 16), ("base_link", 3), ("bäse", 1)])
def test_serialized_trajectory_is_the_same_message(limits, frame_id, points):
    pytest.importorskip("trajectory_msgs")
    from rclpy.serialization import deserialize_message, serialize_message
    from trajectory_msgs.msg import JointTrajectory

    from vqbet_ros.trajectory import serialize_joint_trajectory, to_joint_trajectory

    rng = np.random.default_rng(points)
    start = (limits.lower + limits.upper) / 2
    actions, times = chunk(start, rng.uniform(-0.002, 0.002, 9), w=points)
    traj = make_safe_trajectory(actions, times + 1.7e9, 1.7e9 + 100.0, start, 1.7e9 + 100.0, limits, lead=0.1)
    names = [f"joint_{'x' * (k * points % 5)}" for k in range(9)]  # name lengths that need string padding
    ours = serialize_joint_trajectory(traj, names, frame_id)
    msg = to_joint_trajectory(traj, names, frame_id)
    back = deserialize_message(ours, JointTrajectory)
    assert back == msg  # every field (rmw's own bytes differ only in padding, which it leaves uninitialised)
    assert back.header.frame_id == frame_id and list(back.joint_names) == names and len(back.points) == points
    assert len(ours) <= len(serialize_message(msg))
    from vqbet_ros.bench_ros import trajectory_stamp_ns  # what the latency bench reads from the bytes

    assert trajectory_stamp_ns(ours) == msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
    np.testing.assert_array_equal(np.array([p.positions for p in back.points]), traj.positions)


# ---------------------------------------------------------------------- joint states by name (policy node)
def test_joint_state_merger_maps_by_name_and_merges_partial_messages():
    from vqbet_ros.policy_inputs import JointStateMerger

    names = CALIB.joint_names
    m = JointStateMerger(names)
    assert "no joint state yet" in m.problem(10.0, 0.5)
    arm = names[:7]
    shuffled = list(reversed(arm)) + ["some_other_joint"]
    assert m.update(shuffled, [float(names.index(n)) if n in names else 99.0 for n in shuffled], 10.0) == 7
    assert m.partial == 1 and "panda0_finger_joint1" in m.problem(10.0, 0.5)  # fingers missing: not ready
    m.update(names[7:], [7.0, 8.0], 10.2)
    assert m.problem(10.3, 0.5) is None
    np.testing.assert_allclose(m.positions, np.arange(9.0))  # calibration order, whatever the message order
    problem = m.problem(10.6, 0.5)  # the arm joints (stamped 10.0) are now too old
    assert problem is not None and "old" in problem and "panda0_joint" in problem
    assert m.age(10.6) == pytest.approx(0.6)


@pytest.mark.parametrize("names,positions,match", [
    (["panda0_joint1", "panda0_joint2"], [0.0], "2 names but 1 positions"),
    (["panda0_joint1", "panda0_joint1"], [0.0, 1.0], "duplicate"),
    (["panda0_joint1", "panda0_joint2"], [np.nan, 0.0], "non-finite.*panda0_joint1"),
])
def test_joint_state_merger_rejects_malformed_messages_whole(names, positions, match):
    from vqbet_ros.policy_inputs import JointStateMerger

    m = JointStateMerger(CALIB.joint_names)
    m.update(CALIB.joint_names, np.ones(9), 5.0)
    with pytest.raises(ValueError, match=match):
        m.update(names, positions, 6.0)
    np.testing.assert_allclose(m.positions, np.ones(9))  # nothing of the bad message was taken
    assert m.problem(6.0, 1.5) is None and m.age(6.0) == pytest.approx(1.0)


def test_joint_state_merger_ignores_messages_without_our_joints():
    from vqbet_ros.policy_inputs import JointStateMerger

    m = JointStateMerger(CALIB.joint_names)
    assert m.update(["wheel_left", "wheel_right"], [np.nan, 1.0], 1.0) == 0
    assert "no joint state yet" in m.problem(1.0, 0.5)


# ---------------------------------------------------------------------- images read from CDR bytes (policy node)
@pytest.mark.parametrize("encoding,frame_id", [("bgr8", "cam"), ("rgb8", ""), ("mono8", "wrist_camera_optical")])
def test_raw_image_reads_what_rclpy_reads(encoding, frame_id):
    pytest.importorskip("rclpy")
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    from vqbet_ros import ros_convert
    from vqbet_ros.policy_inputs import RawImage

    rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    msg = ros_convert.rgb_to_image(rgb, 1_700_000_000_123_456_789, encoding, frame_id=frame_id)
    raw = serialize_message(msg)
    img, ref = RawImage.parse(raw), deserialize_message(raw, Image)
    assert (img.header.stamp.sec, img.header.stamp.nanosec, img.header.frame_id) == (1_700_000_000, 123_456_789, frame_id)
    assert (img.height, img.width, img.encoding, img.step, img.is_bigendian) == (48, 64, encoding, ref.step, 0)
    np.testing.assert_array_equal(ros_convert.image_to_rgb(img), ros_convert.image_to_rgb(ref))
    with pytest.raises(ValueError):
        RawImage.parse(raw[: len(raw) - 10])  # data shorter than its declared length
    with pytest.raises(ValueError):
        RawImage.parse(b"\x00\x07\x00\x00" + raw[4:])  # not plain CDR: the node falls back to rclpy
