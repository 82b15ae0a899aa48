"""The chunk-boundary study (``python -m vqbet_ros.blend_study``) over real DDS on loopback: one short episode
per blend mode with the tiny exported blockpush model of test_sim_loop; study.json holds the three modes with
finite motion figures, outcomes and the policy node's counters, and the plot is written."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("pybullet")

from test_sim_loop import IMAGE, _calibration, tiny_blockpush_model  # noqa: E402,F401 - the module fixture

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]
MAX_STEPS = 20


def test_blend_study_runs_every_mode(tiny_blockpush_model, tmp_path, capsys):  # noqa: F811
    from vqbet_ros.blend_study import MODES, MOTION_KEYS, main

    out = tmp_path / "study"
    code = main(["--model", str(tiny_blockpush_model), "--episodes", "1", "--out", str(out), "--max-steps",
                 str(MAX_STEPS), "--image-size", str(IMAGE), "--calibration", str(_calibration(tmp_path / "cal.yaml")),
                 "--seed", "11"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert set(line["modes"]) == set(MODES)
    study = json.loads((out / "study.json").read_text())
    assert list(study["modes"]) == list(MODES) and study["episodes"] == 1 and study["action_chunk"] == 3
    assert study["command"].startswith("python -m vqbet_ros.blend_study --model")
    for mode, row in study["modes"].items():
        assert row["episodes"] == 1 and row["seeds"] == [11], (mode, row)  # every mode plays the same seed
        assert row["mean_length"] == MAX_STEPS
        for key in MOTION_KEYS:
            assert math.isfinite(row["motion"][key]["mean"]) and math.isfinite(row["motion"][key]["worst"]), (mode, key)
            assert row["motion"][key]["worst"] >= row["motion"][key]["mean"] >= 0
        assert row["motion"]["max_velocity_jump"]["worst"] > 0, (mode, row["motion"])  # the pusher was driven
        assert {"R1", "R2", "P1", "P2"} <= set(row) and all(0 <= row[k] <= 1 for k in ("R1", "R2", "P1", "P2"))
        counters = row["policy_node"]
        assert counters["published"] >= MAX_STEPS // 2, (mode, counters)
        for key in ("late_chunks", "skipped_steps", "dropped_past_points", "latency_p50_ms", "latency_p99_ms"):
            assert counters[key] is not None and math.isfinite(counters[key]) and counters[key] >= 0, (mode, key, counters)
    assert (out / "blend_study.png").stat().st_size > 10_000


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    from vqbet_ros.blend_study import main

    for argv, needle in ((["--model", str(tmp_path), "--out", str(tmp_path / "o")], "no model.yaml"),
                         (["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--episodes", "0"], "--episodes"),
                         (["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--modes", "average,fast"], "--modes"),
                         (["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--exp-weight", "nan"], "--exp-weight")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("blend_study: error:") and needle in err, err
