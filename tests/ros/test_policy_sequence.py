"""policy_node runs an operator-ordered subtask sequence (DESIGN.md section 9) over real DDS.

A tiny goal-conditioned image model with a completion head (trained a few steps on synthetic data with
``data/task_index``, exported with ``vqbet export``) drives the node; the test process publishes camera and
joint streams. Checked: the completion score is ignored while disabled; the node advances on its own
completion score (a threshold every score passes), on ``~/next_goal`` and on ``~/goal_reached`` (a threshold
no score reaches); ``~/sequence_status`` and ``/diagnostics`` report progress and the score; after the last
subtask the node sends its hold, disables itself and sends nothing more.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy")

from tests.ros.test_policy_node import NODE, NS, SHIPPED_YAML, Peer, _calibration, is_hold, ros_env  # noqa: E402
from vqbet_core.calibration import load_calibration  # noqa: E402
from vqbet_core.data.store import ZarrDataset  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(300)]
TASKS = ["microwave", "slide_cabinet"]


@pytest.fixture(scope="module")
def sequence_model(tmp_path_factory) -> tuple[Path, Path]:
    """Synthetic zarr (9 Franka joints, 32x24 camera, task_index over two subtasks) -> kitchen-goal-like model."""
    import torch

    from vqbet_core.cli.main import main as vqbet

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("sequence_model")
    cal_path = _calibration(tmp / "cal.yaml")
    calib = load_calibration(cal_path)
    ds = ZarrDataset.create(tmp / "tiny.zarr", {**calib.to_attrs(), "task_names": TASKS, "source": "test"})
    rng = np.random.default_rng(0)
    mid = (calib.lower + calib.upper) / 2
    for e in range(6):
        q = (mid + rng.normal(0, 0.05, mid.size)).astype(np.float32)
        qs, acts = [], []
        for t in range(16):
            a = (q + (0.01 if t < 8 else -0.01)).astype(np.float32)
            qs.append(q.copy())
            acts.append(a)
            q = a
        ds.add_episode({"robot_joint": np.stack(qs), "action": np.stack(acts),
                        "camera_front": rng.integers(0, 255, (16, 24, 32, 3), dtype=np.uint8),
                        "task_index": np.array([0] * 8 + [1] * 8, np.int64), "timestamp": np.arange(16) / 10.0})
    cfg = {"name": "tiny_goal", "policy": "vqbet",
           "data": {"obs_keys": ["robot_joint"], "image_keys": ["camera_front"], "goal_key": "task_index",
                    "val_fraction": 0.0},
           "vision": {"weights": "none", "image_size": [32, 24]}, "obs_window": 3, "action_chunk": 4,
           "vq": {"n_codes": 4, "code_dim": 16, "hidden": 32}, "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 32},
           "heads": {"hidden": 32}, "completion": {"horizon": 2, "hidden": 16},
           "train": {"phase1_steps": 10, "phase2_steps": 4, "batch_size": 16, "phase1_batch_size": 32, "log_every": 5,
                     "val_every": 100, "ckpt_every": 100, "device": "cpu"}}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert vqbet(["train", "--config", str(tmp / "tiny.yaml"), "--data", str(tmp / "tiny.zarr"), "--out",
                  str(tmp / "run"), "--no-progress"]) == 0
    assert vqbet(["export", "--checkpoint", str(tmp / "run"), "--out", str(tmp / "model"), "--parity-steps", "2"]) == 0
    return tmp / "model", cal_path


class StatusPeer(Peer):
    def __init__(self, *args):
        super().__init__(*args)
        from std_msgs.msg import String

        self.status: list[dict] = []
        self.node.create_subscription(String, f"{NODE}/sequence_status", lambda m: self.status.append(json.loads(m.data)), 50)


def start_node(model: Path, cal: Path, log_path: Path, threshold: float, debounce: float = 0.0):
    env = ros_env()
    args = [sys.executable, "-m", "vqbet_ros.policy_node", "--ros-args", "-r", f"__ns:={NS}",
            "--params-file", str(SHIPPED_YAML), "-p", f"model:={model}", "-p", f"calibration:={cal}",
            "-p", f"task_sequence:=[{', '.join(TASKS)}]", "-p", f"completion_threshold:={threshold}", "-p", f"completion_debounce:={debounce}", "-p", "completion_refractory:=0.0",
            "-p", "diagnostics_period:=0.25", "-p", "threads:=1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    calib = load_calibration(cal)
    peer = StatusPeer(int(env["ROS_DOMAIN_ID"]), calib.joint_names, (calib.lower + calib.upper) / 2)
    try:
        peer.get_parameters(["model"])
    except AssertionError:
        proc.kill()
        peer.close()
        raise AssertionError(f"policy_node did not come up: {log_path.read_text()[-3000:]}") from None
    return proc, peer


def stop_node(proc, peer) -> int:
    proc.send_signal(signal.SIGINT)
    code = proc.wait(15)
    peer.close()
    return code


def test_the_node_advances_on_its_own_completion_score_only_while_enabled(sequence_model, tmp_path):
    model, cal = sequence_model
    # every score passes the threshold; the debounce (0.5 s of scores above it) lets it command in between
    proc, peer = start_node(model, cal, tmp_path / "node.log", threshold=0.001, debounce=0.5)
    try:
        peer.wait_for(lambda: peer.status, 10, "a sequence status while disabled")
        time.sleep(1.0)  # streams arrive, the node is disabled: no step, no score, no advance
        assert peer.status[-1]["done"] == 0 and not peer.status[-1]["enabled"] and not peer.trajectories
        assert peer.enable(True).success
        peer.wait_for(lambda: peer.status and peer.status[-1]["finished"], 20, "the sequence to finish on its own")
        last = peer.status[-1]
        assert [a["subtask"] for a in last["advances"]] == TASKS and {a["by"] for a in last["advances"]} == {"model"}
        stamps = [a["stamp"] for a in last["advances"]]
        assert stamps[1] - stamps[0] >= 0.5 - 1e-6, "each subtask held its goal for the debounce time"
        assert last["completion_score"] is not None and last["completion_score"] >= 0.001 and not last["enabled"]
        t_done = time.time()
        time.sleep(1.0)
        after = [m for t, m in peer.trajectories if t > t_done - 0.3]
        assert after and is_hold(after[-1]), "the last trajectory after the sequence is the hold"
        assert not [m for t, m in peer.trajectories if t > t_done + 0.3], "nothing is commanded after the hold"
        diag = peer.diagnostics[-1]
        assert diag["sequence_progress"] == "2/2" and diag["_message"] == "task sequence complete"
        assert not peer.enable(True).success  # a finished sequence does not restart until task_sequence is set
    finally:
        assert stop_node(proc, peer) == 0


def test_the_operator_advances_when_the_score_stays_below_the_threshold(sequence_model, tmp_path):
    from std_msgs.msg import Empty

    model, cal = sequence_model
    proc, peer = start_node(model, cal, tmp_path / "node.log", threshold=1.0)  # a sigmoid never reaches 1.0 here
    try:
        assert peer.enable(True).success
        peer.wait_for(lambda: len(peer.trajectories) > 5, 15, "commanding")
        assert peer.status[-1]["done"] == 0 and peer.status[-1]["goal"] == "microwave"
        assert 0.0 < float(peer.diagnostics[-1]["completion_score"]) < 1.0
        response = peer.next_goal()
        assert response.success and "slide_cabinet" in response.message
        peer.wait_for(lambda: peer.status[-1]["goal"] == "slide_cabinet", 5, "the status to show the next goal")
        peer.goal_reached_pub.publish(Empty())
        peer.wait_for(lambda: peer.status[-1]["finished"], 5, "the sequence to finish on ~/goal_reached")
        assert [a["by"] for a in peer.status[-1]["advances"]] == ["operator", "operator"]
    finally:
        assert stop_node(proc, peer) == 0
