"""``ros2 launch vqbet_bringup ...`` of each launch file, for real, from a folder that is neither the repository
root nor the workspace, on the workspace built as docker/Dockerfile builds it. An independent rclpy node checks
node names, topics, services and parameter values (namespaces, a parameter-file override, launch-argument
overrides, the installed defaults), then a Ctrl-C (SIGINT to the launch's process group, as a terminal sends it)
or a double Ctrl-C must end everything within a few seconds: status 0, no traceback, no escalation to
SIGTERM / SIGKILL, and the recorder's open episode committed (read back with plain zarr)."""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "ros"))
import _launch_support as L  # noqa: E402
import _recorder_support as R  # noqa: E402

pytestmark = [pytest.mark.launch, pytest.mark.ros, pytest.mark.timeout(300)]
STOP_WITHIN = 10.0  # s from the Ctrl-C to the launch's exit (ros2 launch itself escalates to SIGTERM after 5 s)
SHARE = "share/vqbet_bringup"


@pytest.fixture
def run(workspace, elsewhere):
    """Start launches and an observer on one private domain; whatever is left is stopped at the end."""
    env = L.ros_env(workspace["env"])
    state = {"launches": [], "procs": None, "observer": None}

    def launch(args: list[str], name: str = "launch") -> L.Launch:
        proc = L.Launch(args, env, elsewhere, elsewhere / f"{name}.log")
        state["launches"].append(proc)
        return proc

    def observer() -> L.Observer:
        state["observer"] = state["observer"] or L.Observer(int(env["ROS_DOMAIN_ID"]))
        return state["observer"]

    def procs() -> R.Procs:
        state["procs"] = state["procs"] or R.Procs(env, elsewhere)
        return state["procs"]

    try:
        yield {"launch": launch, "observer": observer, "procs": procs, "env": env, "cwd": elsewhere,
               "share": workspace["install"] / "vqbet_bringup" / SHARE}
    finally:
        for proc in state["launches"]:
            proc.close()
        if state["procs"] is not None:
            state["procs"].close()
        if state["observer"] is not None:
            state["observer"].close()


def _override(src: Path, dest: Path, changes: dict[str, dict]) -> Path:
    """A user's parameter file: the installed one with ``changes`` ({node key: {param: value}})."""
    data = yaml.safe_load(src.read_text())
    for key, values in changes.items():
        data[key]["ros__parameters"].update(values)
    dest.write_text(yaml.safe_dump(data))
    return dest


def test_policy_launch_namespace_params_file_and_arguments(run, blockpush_model):
    """policy.launch.py in a namespace, a user's parameter file, enable:=true, a calibration path relative to the
    launch folder; then one Ctrl-C: the node sends its hold and everything ends cleanly."""
    shutil.copy(L.REPO / "calibration/blockpush_sim.yaml", run["cwd"] / "my_robot.yaml")
    params = _override(run["share"] / "config/policy.yaml", run["cwd"] / "my_policy.yaml",
                       {"/**/policy_node": {"max_age": 0.42, "velocity_scale": 0.25}})
    launch = run["launch"](["policy.launch.py", f"model:={blockpush_model}", "calibration:=my_robot.yaml",
                            "namespace:=arm1", f"params_file:={params}", "enable:=true"])
    obs = run["observer"]()
    node = "/arm1/policy_node"
    obs.wait_for(f"{node}/enable", lambda: "/arm1/policy_node/enable" in obs.services(), launch=launch)
    assert obs.services()[f"{node}/enable"] == ["std_srvs/srv/SetBool"]
    assert "/policy_node" not in obs.node_names()
    values = obs.parameters(node, ["max_age", "velocity_scale", "enabled", "calibration", "model", "trigger"])
    assert values == {"max_age": 0.42, "velocity_scale": 0.25, "enabled": True, "calibration": "my_robot.yaml",
                      "model": str(blockpush_model), "trigger": "timer"}, values
    assert obs.lifecycle_state(node) == "active"  # enable:=true: configured and activated by the node itself
    # topics: the parameter file's absolute names (a robot's controller and drivers are not namespaced)
    obs.wait_for("the trajectory publisher", lambda: node in obs.publishers("/arm_controller/joint_trajectory"))
    obs.wait_for("its subscriptions", lambda: node in obs.subscribers("/joint_states")
                 and node in obs.subscribers("/camera/image_raw"), timeout=15)
    took = launch.assert_clean_exit(launch.interrupt(), STOP_WITHIN)
    print(f"policy.launch.py: Ctrl-C -> exit 0 in {took:.2f} s")


def _recording(obs: L.Observer, status: list, launch, min_steps: int = 5) -> dict:
    return obs.wait_for(f"an open episode with {min_steps} steps",
                        lambda: next((s for s in reversed(status) if s["state"] == "recording"
                                      and s["length"] >= min_steps), None), timeout=90, launch=launch)


@pytest.mark.parametrize("stop", ["ctrl_c", "double_ctrl_c", "sigint_to_launch"])
def test_record_launch_stop_commits_the_open_episode(run, stop):
    """record.launch.py (the installed parameter file, task:= overridden; in a namespace for the last variant) with
    an episode open: Ctrl-C, a double Ctrl-C, or a SIGINT to ``ros2 launch`` alone (``docker stop`` with the
    image's STOPSIGNAL, a supervisor) commits it."""
    from std_msgs.msg import String

    cal = R.write_calibration(run["cwd"])
    fake = run["procs"]().start("fake_streams", R.fake_streams_args(run["cwd"] / "pub.jsonl", joint_hz=100))
    ns = "rec1" if stop == "sigint_to_launch" else ""
    rec = f"/{ns}/recorder_node" if ns else "/recorder_node"
    launch = run["launch"](["record.launch.py", "output:=demos.zarr", f"calibration:={cal}", "task:=pick_cube"]
                           + ([f"namespace:={ns}"] if ns else []))
    obs = run["observer"]()
    status = obs.listen(f"{rec}/status", String, json_data=True)
    services = {f"{rec}/{name}" for name in ("start_episode", "end_episode", "discard_episode")}
    obs.wait_for("recorder services", lambda: services <= set(obs.services()), launch=launch)
    values = obs.parameters(rec, ["output", "calibration", "task", "on_shutdown", "max_age"])
    assert values == {"output": "demos.zarr", "calibration": str(cal), "task": "pick_cube", "on_shutdown": "commit",
                      "max_age": 0.1}, values  # max_age: the installed config/recorder.yaml
    assert obs.lifecycle_state(rec) == "active"  # start_active: true in the installed config/recorder.yaml
    obs.wait_for("its subscriptions", lambda: rec in obs.subscribers("/joint_states")
                 and rec in obs.subscribers("/teleop/joint_command"), timeout=15)
    for _ in range(40):  # the streams may still be being discovered: start is refused until they flow
        response = obs.trigger(f"{rec}/start_episode")
        if response.success:
            break
        obs.spin(0.25)
    assert response.success, response.message
    open_episode = _recording(obs, status, launch)
    if ns:
        assert "/recorder_node" not in obs.node_names()
    if stop == "sigint_to_launch":
        started = time.monotonic()
        launch.proc.send_signal(signal.SIGINT)
    else:
        started = launch.interrupt(2 if stop == "double_ctrl_c" else 1)
    took = launch.assert_clean_exit(started, STOP_WITHIN)
    assert fake.poll() is None  # the publisher was not part of the launch
    store = L.read_store(run["cwd"] / "demos.zarr")
    assert len(store["episode_ends"]) == 1, store
    assert store["episode_ends"][0] >= open_episode["length"], (store, open_episode)
    assert set(store["lengths"].values()) == {store["episode_ends"][-1]}, store  # no uncommitted leftovers
    assert "committed episode 0" in launch.output()
    print(f"record.launch.py: {stop} -> exit 0 in {took:.2f} s, open episode committed "
          f"({store['episode_ends'][0]} steps)")


def test_sim_launch_record_mode_in_a_namespace(run):
    """sim.launch.py mode:=record namespace:=sim1 with the installed calibration (the default), a user's parameter
    file, episodes:=0: the whole loop runs under /sim1; a double Ctrl-C mid-episode commits it."""
    from std_msgs.msg import String

    params = _override(run["share"] / "config/sim.yaml", run["cwd"] / "fast_sim.yaml",
                       {"/**/sim_robot_node": {"control_hz": 20.0}})
    launch = run["launch"](["sim.launch.py", "mode:=record", "namespace:=sim1", "episodes:=0", "output:=sim.zarr",
                            f"params_file:={params}"])
    obs = run["observer"]()
    status = obs.listen("/sim1/recorder_node/status", String, json_data=True)
    nodes = {"/sim1/sim_robot_node", "/sim1/scripted_teleop_node", "/sim1/recorder_node"}
    obs.wait_for("the three nodes", lambda: nodes <= obs.node_names(), launch=launch)
    open_episode = _recording(obs, status, launch)  # teleop -> recorder -> sim services all resolved in /sim1
    wanted = {f"/sim1/{t}" for t in ("joint_states", "camera/image_raw", "teleop/joint_command", "sim/state",
                                      "sim/episode_result")}
    obs.wait_for("the namespaced topics, the camera subscriber and the reset service in the graph",
                 lambda: wanted <= set(obs.topics()) and "/sim1/recorder_node" in obs.subscribers(
                     "/sim1/camera/image_raw") and "/sim1/sim_robot_node/reset" in obs.services(),
                 timeout=30, launch=launch)
    topics = obs.topics()
    for topic in ("joint_states", "camera/image_raw", "teleop/joint_command", "sim/state", "sim/episode_result"):
        assert f"/sim1/{topic}" in topics, sorted(topics)
        assert f"/{topic}" not in topics, f"/{topic} outside the namespace"
    assert "/sim1/recorder_node" in obs.subscribers("/sim1/camera/image_raw")
    assert "/sim1/sim_robot_node/reset" in obs.services()
    teleop = obs.parameters("/sim1/scripted_teleop_node", ["recorder", "sim_node", "exit_when_done", "episodes"])
    assert teleop == {"recorder": "recorder_node", "sim_node": "sim_robot_node", "exit_when_done": True, "episodes": 0}
    assert obs.parameters("/sim1/sim_robot_node", ["control_hz"]) == {"control_hz": 20.0}  # the user's file
    calibration = obs.parameters("/sim1/recorder_node", ["calibration"])["calibration"]
    assert calibration == str(run["share"] / "calibration/blockpush_sim.yaml")
    took = launch.assert_clean_exit(launch.interrupt(2), STOP_WITHIN)
    store = L.read_store(run["cwd"] / "sim.zarr")
    committed_before = open_episode["episodes_committed"]
    assert len(store["episode_ends"]) >= committed_before + 1, (store, open_episode)
    assert set(store["lengths"].values()) == {store["episode_ends"][-1]}, store
    print(f"sim.launch.py mode:=record namespace:=sim1: double Ctrl-C -> exit 0 in {took:.2f} s, "
          f"{len(store['episode_ends'])} episodes in the store")


def test_sim_launch_record_mode_ends_after_its_episodes(run):
    """episodes:=1: the teleop node exits after one recorded episode and the launch ends with it, status 0."""
    params = _override(run["share"] / "config/sim.yaml", run["cwd"] / "short.yaml",
                       {"/**/sim_robot_node": {"control_hz": 40.0,
                                               "env_args": "{action_mode: target, image_size: 96, max_steps: 30}"},
                        "/**/scripted_teleop_node": {"keep_failed": True,
                                                     "env_args": "{action_mode: target, max_steps: 30}"}})
    start = time.monotonic()
    launch = run["launch"](["sim.launch.py", "mode:=record", "episodes:=1", "output:=one.zarr",
                            f"params_file:={params}"])
    code = launch.wait(120)
    out = launch.output()
    assert code == 0, f"ros2 launch: {code}\n{out[-3000:]}"
    assert not launch.group_alive()
    assert not sorted({m.group(0) for m in L.BAD_OUTPUT.finditer(out)}), out[-3000:]
    assert "recorded 1 episodes: done" in out
    store = L.read_store(run["cwd"] / "one.zarr")
    assert len(store["episode_ends"]) == 1 and store["episode_ends"][0] > 0, store
    print(f"sim.launch.py episodes:=1 ended on its own in {time.monotonic() - start:.1f} s")


def test_sim_launch_policy_mode_with_the_defaults(run, blockpush_model):
    """sim.launch.py mode:=policy with nothing but model:= (calibration and parameters from the install): the
    policy commands the simulated arm; a Ctrl-C ends both nodes cleanly."""
    from trajectory_msgs.msg import JointTrajectory

    launch = run["launch"](["sim.launch.py", f"model:={blockpush_model}"])
    obs = run["observer"]()
    trajectories = obs.listen("/arm_controller/joint_trajectory", JointTrajectory)
    obs.wait_for("3 trajectories from the policy", lambda: len(trajectories) >= 3, timeout=90, launch=launch)
    assert list(trajectories[-1].joint_names) == ["pusher_x", "pusher_y"]
    # the graph's node list arrives on its own discovery topic, apart from the data: wait for it, never assume it
    obs.wait_for("both nodes in the graph", lambda: {"/sim_robot_node", "/policy_node"} <= obs.node_names(),
                 timeout=30, launch=launch)
    values = obs.parameters("/policy_node", ["calibration", "enabled", "trigger"])
    assert values == {"calibration": str(run["share"] / "calibration/blockpush_sim.yaml"), "enabled": True,
                      "trigger": "camera"}, values
    assert obs.lifecycle_state("/policy_node") == "active"
    took = launch.assert_clean_exit(launch.interrupt(), STOP_WITHIN)
    print(f"sim.launch.py mode:=policy: Ctrl-C -> exit 0 in {took:.2f} s")
