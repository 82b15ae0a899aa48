"""Subtask marks over real DDS (loopback, private domain; DESIGN.md section 9, issue 25 "subtasks recorded per step").

1. recorder_node with ``task_names``: marks on ``~/subtask_done`` in both formats (JSON with a stamp, a plain
   name stamped with the receive time) give the expected ``data/task_index``, read back with plain zarr; bad
   marks (unknown name, stamp beyond ``future_tolerance``, not JSON, no open episode) are counted, never fatal.
2. The equality test: one kitchen expert episode recorded over ROS (sim_robot_node + scripted_teleop_node,
   which forwards the simulator's completions as marks, + recorder_node) has the same per-step ``task_index``
   as ``vqbet sim-demos --env kitchen`` of the same seed. Steps are paired by their robot joint vector (the
   kitchen's sensor noise makes every step's vector unique, and the ROS path executes exactly the direct
   path's steps), so a tick the recorder drops under load cannot shift the comparison.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy")

sys.path.insert(0, str(Path(__file__).parent))
import _recorder_support as S  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]
TASKS = ["reach", "grasp", "place"]


def _read_plain_zarr(path: Path) -> dict:
    import zarr

    g = zarr.open_group(str(path), mode="r")
    return {"task_index": g["data/task_index"][:], "timestamp": g["data/timestamp"][:],
            "episode_ends": g["meta/episode_ends"][:], "task_names": list(g.attrs["task_names"])}


def test_recorder_marks_from_the_topic_become_task_index(tmp_path):
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    from vqbet_ros import ros_convert

    env = S.ros_env()
    cal = S.write_calibration(tmp_path)
    out = tmp_path / "marks.zarr"
    procs = S.Procs(env, tmp_path)
    client = None
    try:
        rec = procs.start("recorder", S.recorder_args(out, cal, {"cameras": "[wrist]", "task_names": f"[{', '.join(TASKS)}]"}))
        client = S.Client(int(env["ROS_DOMAIN_ID"]), "/recorder_node")
        node = client.node
        from sensor_msgs.msg import CompressedImage

        img_pub = node.create_publisher(CompressedImage, "/wrist/image/compressed", 50)
        js_pub = node.create_publisher(JointState, "/joint_states", 200)
        cmd_pub = node.create_publisher(JointState, "/teleop/joint_command", 200)
        mark_pub = node.create_publisher(String, "/recorder_node/subtask_done", 50)
        now = lambda: node.get_clock().now().nanoseconds  # noqa: E731
        rgb = np.zeros((48, 64, 3), np.uint8)
        node.create_timer(0.01, lambda: js_pub.publish(ros_convert.joint_state(S.JOINTS, [0.5] * 3, now())))
        node.create_timer(1 / 30, lambda: cmd_pub.publish(ros_convert.joint_state(S.JOINTS, [0.1] * 3, now())))
        node.create_timer(1 / 30, lambda: img_pub.publish(ros_convert.rgb_to_compressed(rgb, now(), "png")))
        client.wait_ready(proc=rec)
        client.spin(1.0)
        _wait(client, lambda: mark_pub.get_subscription_count() > 0, "the recorder's ~/subtask_done subscription")

        def status_after(n_received):  # the recorder publishes its status at once after each mark
            _wait(client, lambda: client.status and client.status[-1]["marks_received"] >= n_received,
                  f"the recorder to count mark {n_received}")
            return client.status[-1]

        mark_pub.publish(String(data="reach"))  # no open episode: refused, counted
        assert status_after(1)["marks_refused"] == 1
        assert client.call("start_episode").success
        client.spin(1.0)
        t_reach = now() - 300_000_000  # a JSON mark stamped in the past (the operator's key press, say)
        mark_pub.publish(String(data=json.dumps({"task": "reach", "stamp": t_reach * 1e-9})))
        st = status_after(2)
        assert st["marks"] == 1 and st["last_mark"] == "reach", st
        client.spin(0.5)
        sent_grasp = now()
        mark_pub.publish(String(data="grasp"))  # plain name: stamped with the recorder's receive time
        assert status_after(3)["marks"] == 2
        counted_grasp = now()
        for bad in ("lift", json.dumps({"task": "place", "stamp": (now() + 5 * 10**9) * 1e-9}), "{not json"):
            mark_pub.publish(String(data=bad))  # unknown name, 5 s in the future, not JSON: refused, counted
        st = status_after(6)
        assert st["marks"] == 2 and st["marks_refused"] == 4 and st["future_stamps"].get("subtask_done") == 1, st
        client.spin(0.5)
        t_place = now() - 100_000_000
        mark_pub.publish(String(data=json.dumps({"task": "place", "stamp_ns": t_place})))
        assert status_after(7)["marks"] == 3
        client.spin(0.5)
        end = client.call("end_episode")
        assert end.success, end.message
        mark_pub.publish(String(data="place"))  # after the commit: refused
        st = status_after(8)
        client.spin(0.5)
        diag = [s for arr in client.diagnostics for s in arr.status if "recorder" in s.name][-1]
        assert rec.poll() is None, rec.log_path.read_text()[-2000:]
    finally:
        if client is not None:
            client.close()
        procs.close()
    assert st["marks_refused"] == 5 and st["marks_received"] == 8, st
    values = {kv.key: kv.value for kv in diag.values}
    assert values["marks_refused"] == "5" and values["marks"] == "3", values
    log = rec.log_path.read_text()
    assert log.count("subtask mark refused") == 5 and "'lift': expected one of the task names" in log, log[-3000:]

    data = _read_plain_zarr(out)
    assert data["task_names"] == TASKS and list(data["episode_ends"]) == [len(data["task_index"])]
    ticks = S.tick_ns(data["timestamp"], 20)
    ti = data["task_index"]
    assert ti.dtype == np.int64 and len(ti) > 40
    # JSON marks: exact (the last step stamped strictly before the mark closes the subtask)
    np.testing.assert_array_equal(ti[ticks < t_reach], 0)
    np.testing.assert_array_equal(ti[ticks >= t_place], -1)
    # the plain mark: stamped when the recorder received it, between sending and seeing it counted
    np.testing.assert_array_equal(ti[(ticks >= t_reach) & (ticks < sent_grasp)], 1)
    np.testing.assert_array_equal(ti[(ticks >= counted_grasp) & (ticks < t_place)], 2)
    assert np.all(np.diff(ti[ti >= 0]) >= 0) and set(ti.tolist()) == {-1, 0, 1, 2}


def _wait(client, predicate, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        client.spin(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


SEED = 1  # sim-demos' base seed: its first episode runs env seed 1_000_000, which the simulator is given
KITCHEN_ARGS = "{state_velocities: false}"


def test_kitchen_episode_over_ros_has_the_task_index_of_sim_demos(tmp_path):
    from vqbet_core.cli.main import main as vqbet
    from vqbet_core.data.store import ZarrDataset
    from vqbet_core.data.tasks import marks_from_task_index
    from vqbet_ros.sim_demo import NodeProcess, ros_env

    # the direct recording first (3 s): it also gives the task names
    direct_out = tmp_path / "direct.zarr"
    assert vqbet(["sim-demos", "--env", "kitchen", "--episodes", "1", "--seed", str(SEED), "--out", str(direct_out),
                  "--env-arg", "state_velocities=false", "--no-progress"]) == 0
    direct = ZarrDataset.open(direct_out, "r")
    names = list(direct.attrs["task_names"])
    env_seed = int(direct.attrs["episode_seeds"][0])
    assert len(names) == 5 and env_seed == SEED * 1_000_000
    d_ti, d_q = direct.read("task_index"), direct.read("robot_joint")

    raw = yaml.safe_load((S.REPO / "calibration/franka_sim.yaml").read_text())
    raw["cameras"] = {}  # the kitchen without image_size publishes no camera
    # the shipped calibration is the simulated kitchen's: its joints and rate (the recorder samples on its grid)
    assert raw["joint_names"] == list(direct.attrs["joint_names"])
    assert raw["control_hz"] == float(direct.attrs["control_hz"])
    cal = tmp_path / "franka_nocam.yaml"
    cal.write_text(yaml.safe_dump(raw))
    out = tmp_path / "ros.zarr"
    params = tmp_path / "recorder.yaml"
    params.write_text(yaml.safe_dump({"/**/recorder_node": {"ros__parameters": {
        "output": str(out), "calibration": str(cal), "task_names": names, "min_free_mb": 20.0, "stop_free_mb": 10.0,
        "status_period": 0.5}}}))
    env = ros_env()
    kitchen = ["-p", "env:=kitchen", "-p", f"env_args:='{KITCHEN_ARGS}'"]
    sim = NodeProcess("sim_robot_node", kitchen + ["-p", f"seed:={env_seed}", "-p", "autostart:=false",
                                                   "-p", "auto_reset:=false"], env, tmp_path / "sim.log")
    teleop = NodeProcess("scripted_teleop_node", kitchen + [
        "-p", "recorder:=/recorder_node", "-p", "episodes:=1", "-p", "keep_failed:=true", "-p", "exit_when_done:=true"],
        env, tmp_path / "teleop.log")
    recorder = NodeProcess("recorder_node", ["--params-file", str(params)], env, tmp_path / "recorder.log")
    t0 = time.monotonic()
    try:
        code = teleop.wait(120)
        assert code == 0, (f"teleop exit {code}: {teleop.log_tail()}\nrecorder: {recorder.log_tail()}\n"
                           f"sim: {sim.log_tail()}")
    finally:
        teleop.stop()
        rec_code = recorder.stop()
        sim_code = sim.stop()
    took = time.monotonic() - t0
    assert rec_code == 0 and sim_code == 0, (recorder.log_tail(), sim.log_tail())
    assert "ending without every subtask mark counted" not in teleop.log_tail(20000)

    ros = ZarrDataset.open(out, "r")
    assert ros.n_episodes == 1 and list(ros.attrs["task_names"]) == names
    r_ti, r_q = ros.read("task_index"), ros.read("robot_joint")
    # pair every recorded step with the direct step of the same joint vector
    match = [np.flatnonzero(np.all(d_q == q, axis=1)) for q in r_q]
    paired = [(i, int(m[0])) for i, m in enumerate(match) if len(m) == 1]
    unpaired = [i for i, m in enumerate(match) if len(m) != 1]
    # only the last recorded tick may be unpaired: the observation after the last action, which sim-demos does
    # not store (the recorder pairs it with the last command, still within max_age)
    assert unpaired in ([], [len(r_q) - 1]), (unpaired, len(r_q), len(d_q))
    steps = np.array([j for _, j in paired])
    assert np.all(np.diff(steps) > 0), "recorded steps out of order"
    assert len(paired) >= len(d_q) - 3, f"ROS recorded {len(paired)} of the {len(d_q)} direct steps"
    rows = np.array([i for i, _ in paired])
    np.testing.assert_array_equal(r_ti[rows], d_ti[steps])  # the equality: step for step
    for i in unpaired:
        assert r_ti[i] == -1  # after the last mark: no subtask (sim-demos ends there)
    # and the subtask runs: the same names in the same order, switching at the same steps
    assert [n for _, n in marks_from_task_index(r_ti, names)] == [n for _, n in marks_from_task_index(d_ti, names)]
    assert len(marks_from_task_index(d_ti, names)) == 4
    print(f"kitchen seed {env_seed}: {len(d_q)} direct steps, {len(r_q)} recorded over ROS ({len(paired)} paired), "
          f"subtasks {[n for _, n in marks_from_task_index(d_ti, names)]}; ROS part took {took:.1f} s")
