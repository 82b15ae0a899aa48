"""The shipped long-horizon model drives the simulated Franka over real DDS (``make demo``'s loop, in CI time).

``models/kitchen_image_goal`` (committed: nobody should need hours of training to see it) loads, and
``python -m vqbet_ros.kitchen_demo`` runs it through ``policy_node`` against ``sim_robot_node`` (MuJoCo kitchen,
96x96 camera, ``calibration/franka_sim.yaml``) for one short episode with a requested order. A few seconds of
motion, not a quality check: the quality figures come from the full demo and ``vqbet eval`` (README).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("rclpy")
pytest.importorskip("mujoco")

pytestmark = [pytest.mark.ros, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "kitchen_image_goal"


def test_the_shipped_model_folder_is_complete_and_verified():
    from vqbet_core.runtime.spec import load_spec

    spec = load_spec(MODEL)  # checks every file's sha256 against model.yaml
    card = (MODEL / "card.md").read_text()
    assert spec.goal_dim == 5 and spec.completion_horizon >= 1
    assert sorted(spec.goal_names) == ["bottom burner", "hinge cabinet", "light switch", "microwave", "slide cabinet"]
    calibration = yaml.safe_load((REPO / "calibration/franka_sim.yaml").read_text())
    assert spec.joint_names == calibration["joint_names"] and spec.control_hz == calibration["control_hz"]
    assert "vqbet eval" in card and "requested order" in card  # how it was made and what it measured
    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 70e6  # fp32 + int8 encoders, policy: ~65 MB
    # the int8 encoder is the one loaded by default, and its decision check is on record
    assert spec.meta["encoder_precision"] == "int8" and spec.encoder_int8_file.is_file()
    parity = spec.meta["files"]["encoder_int8"]["parity"]
    assert parity["code_agreement"] >= parity["min_agreement"] >= 0.99 and parity["heldout_frames"] >= 300


def test_the_shipped_model_drives_a_short_kitchen_episode_over_dds(tmp_path, capsys):
    from vqbet_ros.kitchen_demo import main

    assert main(["--episodes", "1", "--max-steps", "40", "--out", str(tmp_path / "demo"),
                 "--sequence", "microwave,light switch,slide cabinet,hinge cabinet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (episode,) = out["results"]
    assert episode["requested"] == ["microwave", "light switch", "slide cabinet", "hinge cabinet"]
    assert episode["trajectories"] >= 10  # the node commanded the arm over DDS
    assert out["ros"]["sim_robot_node"]["steps"] >= 40 and out["ros"]["policy_node"]["published"] >= 10
    assert 0 <= out["in_order_mean"] <= 4 and (tmp_path / "demo" / "metrics.json").exists()
    assert out["contact_sheet"] and Path(out["contact_sheet"]).exists()


def test_a_model_that_is_not_goal_conditioned_is_a_one_line_error(tmp_path, capsys):
    from vqbet_ros.kitchen_demo import main

    assert main(["--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kitchen_demo: error: --model") and "model.yaml" in err and len(err.splitlines()) == 1
