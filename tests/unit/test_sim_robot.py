"""SimRobot (joint_trajectory_controller emulation without ROS) and blockpush's joint-target mode."""

import json

import numpy as np
import pytest

pytest.importorskip("pybullet")

from vqbet_core.errors import VqbetError  # noqa: E402
from vqbet_core.sim.base import EpisodeResult, SimEnv  # noqa: E402
from vqbet_core.sim.blockpush import EFFECTOR_START, JOINT_NAMES, MAX_STEP, BlockPushEnv  # noqa: E402
from vqbet_core.sim.robot import SimRobot, TrajectoryRejected  # noqa: E402


class RecordingEnv(SimEnv):
    """A tiny real env with the joint protocol: the joints go exactly to the target each step (so the
    controller's commanded targets can be read back), and every target is recorded."""

    name = "recording"
    joint_names = ["a", "b"]
    action_is_joint_target = True
    control_hz = 10.0

    def __init__(self):
        self.q = np.zeros(2)
        self.targets = []

    obs_keys = property(lambda self: ["robot_joint"])
    action_dim = property(lambda self: 2)
    max_steps = property(lambda self: 5)

    def reset(self, seed=None):
        self.q = np.array([1.0, -1.0]) * (0 if seed is None else seed)
        self.targets, self.t = [], 0
        return {"robot_joint": self.q.copy()}

    def joint_positions(self):
        return self.q.copy()

    def step_joints(self, targets):
        self.q = np.asarray(targets, np.float64).copy()
        self.targets.append(self.q.copy())
        self.t += 1
        return {"robot_joint": self.q.copy()}, self.t >= self.max_steps

    step = step_joints

    def result(self):
        return EpisodeResult(success=False, length=self.t)

    def make_expert(self):
        raise NotImplementedError

    @staticmethod
    def summarize(results, demo_modes=None):
        return {"episodes": len(results)}


@pytest.fixture
def robot():
    r = SimRobot(RecordingEnv())
    r.reset(seed=0)
    return r


def test_holds_start_position_without_a_trajectory(robot):
    robot.reset(seed=2)
    for k in range(3):
        robot.tick(100.0 + 0.1 * k)
    np.testing.assert_allclose(robot.env.targets, [[2.0, -2.0]] * 3)


def test_interpolates_linearly_in_time_and_holds_the_end(robot):
    # points at t=1 and t=2 (absolute); starts from the position commanded when it arrives (0, 0 at t=0)
    kept = robot.set_trajectory(["a", "b"], [1.0, 2.0], [[1.0, 10.0], [3.0, 30.0]], now=0.0)
    assert kept == 2
    for t in (0.5, 1.0, 1.25, 2.0, 7.0):
        robot.tick(t)
    np.testing.assert_allclose(robot.env.targets, [[0.5, 5.0], [1.0, 10.0], [1.5, 15.0], [3.0, 30.0], [3.0, 30.0]])
    assert robot.done  # RecordingEnv ends after 5 steps; a finished episode is not stepped any more
    robot.tick(8.0)
    assert len(robot.env.targets) == 5


def test_joints_are_mapped_by_name(robot):
    robot.set_trajectory(["b", "a"], [1.0], [[-4.0, 2.0]], now=0.0)
    robot.tick(1.0)
    np.testing.assert_allclose(robot.env.targets[-1], [2.0, -4.0])


def test_new_trajectory_replaces_the_running_one_from_the_commanded_position(robot):
    robot.set_trajectory(["a", "b"], [1.0, 2.0], [[1.0, 1.0], [2.0, 2.0]], now=0.0)
    robot.tick(0.5)  # commanded (0.5, 0.5)
    # replacement at t=0.5 whose first point is in the future: from the commanded (0.5, 0.5) to (-1, -1) at t=1.5
    kept = robot.set_trajectory(["a", "b"], [1.5], [[-1.0, -1.0]], now=0.5)
    assert kept == 1
    robot.tick(1.0)
    np.testing.assert_allclose(robot.env.targets[-1], [-0.25, -0.25])
    robot.tick(1.4)
    np.testing.assert_allclose(robot.env.targets[-1], [-0.85, -0.85])


def test_a_trajectory_that_started_in_the_past_is_joined_on_its_path_now(robot):
    """Jazzy's controller samples a late trajectory at the current time: the target jumps onto its path."""
    robot.set_trajectory(["a", "b"], [1.0, 2.0], [[1.0, 1.0], [2.0, 2.0]], now=0.0)
    robot.tick(0.5)  # commanded (0.5, 0.5)
    kept = robot.set_trajectory(["a", "b"], [0.4, 1.5], [[9.0, 9.0], [-1.0, -1.0]], now=0.5)
    assert kept == 1
    robot.tick(0.5)
    np.testing.assert_allclose(robot.env.targets[-1], [9.0 - 10.0 * 0.1 / 1.1] * 2)  # on the path at t=0.5
    robot.tick(1.0)
    np.testing.assert_allclose(robot.env.targets[-1], [9.0 - 10.0 * 0.6 / 1.1] * 2)


def test_points_with_velocities_follow_cubic_splines_with_continuous_velocity(robot):
    # one joint moving 0 -> 1 -> 0 with velocities 1, 0, -1 at t = 1, 2, 3 (the trajectory arrives at t=0, at rest)
    robot.set_trajectory(["a", "b"], [1.0, 2.0, 3.0], [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], now=0.0,
                         velocities=[[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    pos, vel = robot.commanded_state(1.5)
    s = 0.5  # Hermite at the segment's middle: (p0 + p1) / 2 + h (v0 - v1) / 8
    np.testing.assert_allclose(pos, [0.5 + (1.0 - 0.0) / 8, 0.0])
    for t in (1.0, 2.0):  # velocity continuous at the points, equal to the given ones
        before, after = robot.commanded_state(t - 1e-7)[1], robot.commanded_state(t + 1e-7)[1]
        np.testing.assert_allclose(before, after, atol=1e-5)
    np.testing.assert_allclose(robot.commanded_state(2.0)[1], [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(robot.commanded_state(0.5)[0], [-0.125, 0.0])  # from rest at 0 to (0, v=1) at t=1
    np.testing.assert_allclose(robot.commanded_state(9.0), ([0.0, 0.0], [0.0, 0.0]))  # hold at the end
    assert s == 0.5


def test_motion_metrics_see_a_velocity_jump_and_not_a_smooth_path():
    from vqbet_core.sim.robot import motion_metrics

    t = np.arange(50) * 0.1
    smooth = np.sin(t)[:, None]
    kinked = np.where(t < 2.5, t, 2.5)[:, None]  # velocity 1 then 0
    assert motion_metrics(smooth, 0.1)["max_velocity_jump"] < 0.11
    m = motion_metrics(kinked, 0.1)
    assert m["max_velocity_jump"] == pytest.approx(1.0) and m["peak_jerk"] > 50 * motion_metrics(smooth, 0.1)["peak_jerk"]


def test_empty_trajectory_stops_where_commanded_now(robot):
    robot.set_trajectory(["a", "b"], [1.0], [[1.0, 2.0]], now=0.0)
    robot.set_trajectory(["a", "b"], [], np.zeros((0, 2)), now=0.5)
    robot.tick(0.8)
    robot.tick(3.0)
    np.testing.assert_allclose(robot.env.targets, [[0.5, 1.0], [0.5, 1.0]])


def test_bad_trajectories_are_rejected_and_the_running_one_kept(robot):
    robot.set_trajectory(["a", "b"], [1.0], [[1.0, 1.0]], now=0.0)
    bad = [
        (["a"], [2.0], [[1.0]], "missing"),
        (["a", "b", "c"], [2.0], [[1.0, 1.0, 1.0]], "unknown"),
        (["a", "a"], [2.0], [[1.0, 1.0]], "duplicates"),
        (["a", "b"], [2.0], [[np.nan, 1.0]], "non-finite"),
        (["a", "b"], [2.0, 1.5], [[1.0, 1.0], [2.0, 2.0]], "increasing"),
        (["a", "b"], [2.0, 3.0], [[1.0, 1.0]], "point times"),
        (["a", "b"], [0.1, 0.2], [[5.0, 5.0], [6.0, 6.0]], "before it arrived"),
    ]
    for names, times, pos, why in bad:
        with pytest.raises(TrajectoryRejected, match=why):
            robot.set_trajectory(names, times, pos, now=0.3)
    assert robot.rejected == len(bad)
    robot.tick(1.0)
    np.testing.assert_allclose(robot.env.targets[-1], [1.0, 1.0])


def test_teleop_target_is_applied_from_the_next_tick(robot):
    robot.set_trajectory(["a", "b"], [10.0], [[5.0, 5.0]], now=0.0)
    robot.set_target(["b", "a"], [[0.2, 0.1]], now=1.0)  # replaces the trajectory: go there now
    robot.tick(1.1)
    robot.tick(1.2)
    np.testing.assert_allclose(robot.env.targets, [[0.1, 0.2], [0.1, 0.2]])
    with pytest.raises(TrajectoryRejected):
        robot.set_target(["a", "b"], [[0.0, 0.0], [1.0, 1.0]], now=1.3)


def test_env_without_joints_is_refused():
    class NoJoints(RecordingEnv):
        joint_names = []

    with pytest.raises(VqbetError, match="cannot be driven"):
        SimRobot(NoJoints())
    with pytest.raises(VqbetError, match="before reset"):
        SimRobot(RecordingEnv()).tick(0.0)


# ---------------------------------------------------------------------- blockpush as a robot
def test_blockpush_target_mode_observation_and_attrs():
    env = BlockPushEnv(action_mode="target")
    try:
        assert env.joint_names == JOINT_NAMES == ["pusher_x", "pusher_y"] and env.action_is_joint_target
        obs = env.reset(seed=3)
        assert env.obs_keys == ["state", "robot_joint"] and set(obs) == {"state", "robot_joint"}
        assert obs["robot_joint"].dtype == np.float32 and obs["robot_joint"].shape == (2,)
        np.testing.assert_allclose(obs["robot_joint"], EFFECTOR_START, atol=2e-3)
        np.testing.assert_allclose(env.joint_positions(), obs["robot_joint"], atol=1e-6)
        attrs = env.dataset_attrs()
        assert attrs["joint_names"] == JOINT_NAMES and attrs["action_mode"] == "target"
        json.dumps(attrs)
        # an absolute target is reached at most MAX_STEP per step, then held
        goal = EFFECTOR_START + np.array([0.0, 0.1])
        for k in range(6):
            obs, _ = env.step(goal)
            expected = EFFECTOR_START[1] + min(MAX_STEP * (k + 1), 0.1)
            assert abs(float(obs["state"][9]) - expected) < 1e-6  # effector_target_y
        np.testing.assert_allclose(obs["robot_joint"], goal, atol=3e-3)
        with pytest.raises(VqbetError, match="pusher_x, pusher_y"):
            env.step(np.array([np.nan, 0.0]))
    finally:
        env.close()
    with pytest.raises(VqbetError, match="action_mode"):
        BlockPushEnv(action_mode="velocity")


def test_blockpush_target_mode_replays_the_delta_mode_expert():
    """Same seed, same expert: target mode moves the world like delta mode (the two differ only by float32 rounding
    of the targets, which block contacts amplify a little)."""
    runs = {}
    for mode in ("delta", "target"):
        env = BlockPushEnv(action_mode=mode)
        try:
            obs = env.reset(seed=5)
            expert = env.make_expert()
            expert.reset(env, np.random.default_rng([5, 1]))
            states, actions = [], []
            for _ in range(60):
                a = expert.act(obs)
                actions.append(np.asarray(a))
                obs, done = env.step(a)
                states.append(obs["state"])
            runs[mode] = (np.stack(states), np.stack(actions))
        finally:
            env.close()
    (s_d, a_d), (s_t, a_t) = runs["delta"], runs["target"]
    np.testing.assert_allclose(s_t, s_d, atol=2e-3)
    assert np.abs(s_t[:, 6:10] - s_d[:, 6:10]).max() < 2e-4  # the effector follows the same path
    # target-mode actions are the absolute targets: the effector target after each step
    np.testing.assert_allclose(a_t, s_t[:, 8:10], atol=1e-5)
    assert np.abs(a_d).max() <= MAX_STEP + 1e-6


def test_simrobot_drives_blockpush_along_a_trajectory():
    env = BlockPushEnv(action_mode="target")
    robot = SimRobot(env)
    try:
        assert robot.control_hz == 10.0
        robot.reset(seed=1)
        start = robot.joint_positions()
        # 0.15 m in x over 1 s (0.15 m/s, below the pusher's 0.3 m/s), given by name in reverse order
        robot.set_trajectory(["pusher_y", "pusher_x"], [1.0], [[start[1], start[0] + 0.15]], now=0.0)
        xs = []
        for k in range(1, 13):
            robot.tick(0.1 * k)
            xs.append(robot.joint_positions()[0])
        assert np.all(np.diff(xs) > -1e-4)  # moves monotonically
        assert abs(xs[4] - (start[0] + 0.075)) < 0.01  # half way at t=0.5
        assert abs(xs[-1] - (start[0] + 0.15)) < 0.005  # arrived and holding
        assert abs(robot.joint_positions()[1] - start[1]) < 0.005
    finally:
        env.close()


def test_env_with_joint_names_but_no_protocol_is_refused():
    class Half(RecordingEnv):
        action_is_joint_target = False
        step_joints = SimEnv.step_joints

    with pytest.raises(VqbetError, match="does not implement"):
        SimRobot(Half())

    class ActionIsTarget(RecordingEnv):  # the base step_joints forwards to step() when the action is the target
        step_joints = SimEnv.step_joints

    r = SimRobot(ActionIsTarget())
    r.reset(seed=0)
    r.set_target(["a", "b"], [[0.3, 0.4]], now=0.0)
    r.tick(0.1)
    np.testing.assert_allclose(r.env.targets, [[0.3, 0.4]])


def test_scripted_teleop_driver_replays_the_sim_demos_expert():
    """scripted_teleop_node's ROS-free core: /sim/state vectors in, the same targets sim-demos records out."""
    teleop = pytest.importorskip("vqbet_ros.scripted_teleop_node")
    from vqbet_ros.sim_state import STATE_HEADER, lowdim_vector

    seed = 4
    env, local = BlockPushEnv(action_mode="target"), BlockPushEnv(action_mode="target")
    try:
        driver = teleop.ExpertDriver(local)
        obs = env.reset(seed=seed)
        expert = env.make_expert()
        expert.reset(env, np.random.default_rng([seed, 1]))  # what vqbet sim-demos does for this seed
        for step in range(30):
            header = [2, seed, step, 1.0, 1700000000 + step, 5]
            data = np.concatenate([header, lowdim_vector(obs, env.obs_keys)])
            target, stamp_ns = driver.act(data)
            assert stamp_ns == (1700000000 + step) * 1_000_000_000 + 5
            np.testing.assert_array_equal(target.astype(np.float32), expert.act(obs))
            assert driver.act(data) is None  # the same step again: no second command
            obs, _ = env.step(target)
        stopped = np.concatenate([[2, seed, 30, 0.0, 0, 0], lowdim_vector(obs, env.obs_keys)])
        assert driver.act(stopped) is None  # episode over: the operator lets go
        assert len(STATE_HEADER) == 6
        with pytest.raises(ValueError, match="state values"):
            driver.act(np.concatenate([[3, seed, 0, 1.0, 0, 0], np.zeros(5)]))
        with pytest.raises(VqbetError, match="action_mode: target"):
            teleop.ExpertDriver(BlockPushEnv())
    finally:
        env.close()
        local.close()
