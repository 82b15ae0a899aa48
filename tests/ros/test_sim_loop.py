"""The simulated robot over real DDS (loopback, private domain): sim_robot_node as a process, driven by

1. policy_node with a tiny exported blockpush model (trained for a few steps on two expert demos made with
   ``vqbet sim-demos --env-arg action_mode=target``): trajectories flow, the pusher moves, an episode result
   arrives; and
2. scripted_teleop_node + recorder_node: one short "teleoperated" episode is recorded, and its actions are
   exactly the joint targets the teleop node published for the recorded observations.

The same sim_robot_node process serves both (module fixture), as the demo does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy")
pytest.importorskip("pybullet")

from vqbet_core.data.store import ZarrDataset  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parents[2]
IMAGE = 32
MAX_STEPS = 25  # 2.5 s episodes


def _calibration(path: Path) -> Path:
    raw = yaml.safe_load((REPO / "calibration/blockpush_sim.yaml").read_text())
    raw["cameras"]["front"]["size"] = [IMAGE, IMAGE]
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def tiny_blockpush_model(tmp_path_factory) -> Path:
    import torch

    from vqbet_core.cli.main import main as vqbet

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("sim_model")
    assert vqbet(["sim-demos", "--env", "blockpush", "--episodes", "2", "--out", str(tmp / "demos.zarr"),
                  "--env-arg", "action_mode=target", "--env-arg", f"image_size={IMAGE}", "--no-progress"]) == 0
    ds = ZarrDataset.open(tmp / "demos.zarr", "r")
    assert ds.attrs["joint_names"] == ["pusher_x", "pusher_y"] and {"robot_joint", "camera_front", "action"} <= set(ds.keys)
    cfg = {"name": "tiny_sim", "policy": "vqbet",
           "data": {"obs_keys": ["robot_joint"], "image_keys": ["camera_front"], "val_fraction": 0.0},
           "vision": {"weights": "none", "image_size": IMAGE}, "obs_window": 2, "action_chunk": 3,
           "vq": {"n_codes": 4, "code_dim": 16, "hidden": 32}, "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 32},
           "heads": {"hidden": 32},
           "train": {"phase1_steps": 10, "phase2_steps": 4, "batch_size": 16, "phase1_batch_size": 32, "log_every": 5,
                     "val_every": 100, "ckpt_every": 100, "device": "cpu"}}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert vqbet(["train", "--config", str(tmp / "tiny.yaml"), "--data", str(tmp / "demos.zarr"), "--out",
                  str(tmp / "run"), "--no-progress"]) == 0
    assert vqbet(["export", "--checkpoint", str(tmp / "run"), "--out", str(tmp / "model"), "--parity-steps", "2"]) == 0
    return tmp / "model"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """sim_robot_node (idle until ~/reset) + this test's session node, on a private domain."""
    from vqbet_ros.sim_demo import NodeProcess, SimSession, ros_env, sim_robot_args

    tmp = tmp_path_factory.mktemp("sim_loop")
    env = ros_env()
    node = NodeProcess("sim_robot_node", sim_robot_args(IMAGE, MAX_STEPS, seed=7), env, tmp / "sim_robot_node.log")
    session = SimSession(int(env["ROS_DOMAIN_ID"]))
    try:
        yield {"env": env, "node": node, "session": session, "tmp": tmp}
    finally:
        session.close()
        code = node.stop()
        assert code == 0, f"sim_robot_node exited with {code}: {node.log_tail()}"


def test_policy_node_drives_the_simulated_robot(sim, tiny_blockpush_model):
    from vqbet_ros.sim_demo import NodeProcess, policy_args

    s, tmp = sim["session"], sim["tmp"]
    policy = NodeProcess("policy_node", policy_args(tiny_blockpush_model, _calibration(tmp / "cal.yaml")), sim["env"],
                         tmp / "policy_node.log")
    try:
        try:
            s.enable(False)  # waits for the service: the policy node is up
        except Exception as exc:
            raise AssertionError(f"policy_node did not come up ({exc}): {policy.log_tail()}") from None
        start = len(s.joint_states)
        result = s.run_episode(timeout=60, frames=True)
        s.enable(False)
    finally:
        code = policy.stop()
    assert code == 0, policy.log_tail()
    assert result["seed"] == 7 and result["env"] == "blockpush"
    assert result["length"] == MAX_STEPS and result["success"] is False  # an untrained model does not push blocks home
    assert {"reached", "in_target", "block_targets"} <= set(result["info"])
    # trajectories flowed: about one per control step, for the simulator's joints, with future points
    assert result["trajectories"] >= MAX_STEPS // 2, result
    t, msg = s.trajectories[-1]
    assert list(msg.joint_names) == ["pusher_x", "pusher_y"] and len(msg.points) >= 1
    # the simulated pusher moved (the untrained policy commands roughly the demos' mean target)
    names, q = s.joint_states[start][1], np.stack([js[2] for js in s.joint_states[start:]])
    assert names == ["pusher_x", "pusher_y"]
    assert np.linalg.norm(q.max(0) - q.min(0)) > 0.01, q
    # camera frames of the episode came over DDS
    assert len(s.frames) >= MAX_STEPS // 2 and s.frames[0].shape == (IMAGE, IMAGE, 3)


def test_scripted_teleop_records_an_episode(sim):
    from vqbet_ros.sim_demo import BRINGUP_CONFIG, NodeProcess

    s, tmp = sim["session"], sim["tmp"]
    out = tmp / "recorded.zarr"
    # the teleop node first: it publishes nothing until the recorder is up, and this test's session must have
    # matched its command publisher by then (the teleop's own subscriber count only says the writer side matched;
    # a reader that matches later loses the first commands)
    teleop = NodeProcess("scripted_teleop_node", [
        "--params-file", str(BRINGUP_CONFIG / "sim.yaml"), "-p", "recorder:=/recorder_node", "-p", "episodes:=1",
        "-p", "keep_failed:=true", "-p", "exit_when_done:=true",
        "-p", "min_subscribers:=2",  # the recorder and this test's session: both must see every command
        "-p", f"env_args:='{{action_mode: target, max_steps: {MAX_STEPS}}}'"], sim["env"], tmp / "teleop.log")
    recorder = None
    n_results = len(s.results)
    try:
        s.wait_for(lambda: s.teleop_sub.get_publisher_count() > 0, 30, "the session to match the teleop's commands")
        recorder = NodeProcess("recorder_node", [
            "--params-file", str(BRINGUP_CONFIG / "recorder.yaml"), "-p", f"output:={out}",
            "-p", f"calibration:={_calibration(tmp / 'cal_rec.yaml')}", "-p", "min_free_mb:=20.0",
            "-p", "stop_free_mb:=10.0"], sim["env"], tmp / "recorder_node.log")
        code = teleop.wait(60)
        assert code == 0, f"teleop exit {code}: {teleop.log_tail()}\nrecorder: {recorder.log_tail()}"
    finally:
        teleop.stop()
        assert recorder is None or recorder.stop() == 0, recorder.log_tail()
    result = s.results[n_results]
    assert result["length"] == MAX_STEPS
    ds = ZarrDataset.open(out, "r")
    assert ds.n_episodes == 1
    assert ds.attrs["joint_names"] == ["pusher_x", "pusher_y"]
    action, q, stamps = ds.read("action"), ds.read("robot_joint"), ds.read("timestamp")
    assert MAX_STEPS - 6 <= len(action) <= MAX_STEPS + 3, len(action)
    assert ds.read("camera_front").shape[1:] == (IMAGE, IMAGE, 3)
    # every recorded action is the teleop target sent for the latest observation at or before the sample time
    teleop_msgs = [m for m in s.teleop if m[1] == ["pusher_x", "pusher_y"]]
    assert len(teleop_msgs) >= MAX_STEPS - 1
    t_cmd = np.array([m[0] for m in teleop_msgs], np.int64)
    cmd = np.stack([m[2] for m in teleop_msgs]).astype(np.float32)
    t_rec = np.round(np.asarray(stamps, np.float64) * 1e9).astype(np.int64)
    idx = np.searchsorted(t_cmd, t_rec + 1_000_000, side="right") - 1  # 1 ms slack: float64 seconds round trip
    assert np.all(idx >= 0)
    np.testing.assert_array_equal(action, cmd[idx])
    # they are targets ahead of the measured pusher (the expert walks around blocks), not copies of it
    assert np.abs(action - q).max() > 0.005
    json.dumps(result)


def test_reset_service_starts_the_next_seed_and_ignores_stale_commands(sim):
    from builtin_interfaces.msg import Duration
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    from vqbet_ros import ros_convert

    s = sim["session"]
    pub = s.node.create_publisher(JointTrajectory, "/arm_controller/joint_trajectory", 10)
    s.wait_for(lambda: pub.get_subscription_count() > 0, 10, "the simulator's trajectory subscription")
    first = s.reset()
    before_reset = s.node.get_clock().now().nanoseconds
    time.sleep(0.05)
    second = s.reset()
    assert second["episode"] == first["episode"] + 1 and second["seed"] == first["seed"] + 1
    # a trajectory stamped before the reset (a command for the previous episode, still in flight) is ignored
    stale = JointTrajectory(joint_names=["pusher_x", "pusher_y"])
    stale.header.stamp = ros_convert.ns_to_time(before_reset)
    stale.points = [JointTrajectoryPoint(positions=[0.6, 0.3], time_from_start=Duration(sec=5))]
    pub.publish(stale)
    n = len(s.joint_states)
    # the new episode runs (no valid command: the pusher holds) and ends after MAX_STEPS with a result
    s.wait_for(lambda: any(r["episode"] == second["episode"] for r in s.results), 30, "the held episode's result")
    r = next(r for r in s.results if r["episode"] == second["episode"])
    assert r["length"] == MAX_STEPS and r["info"]["reached"] == 0
    q = np.stack([js[2] for js in s.joint_states[n:]])
    np.testing.assert_allclose(q, np.tile([0.3, -0.4], (len(q), 1)), atol=3e-3)  # EFFECTOR_START, held
