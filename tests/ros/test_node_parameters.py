"""Sweep of the required / constrained parameters and inputs of every node and command (issue 24.6).

Each missing or wrong one must give exactly one line naming it and what was expected, exit status 2,
and no Python traceback: the nodes (policy_node, recorder_node, record_keyboard, sim_robot_node,
scripted_teleop_node) and the ``vqbet`` commands.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

sys.path.insert(0, str(Path(__file__).parent))
import _recorder_support as S  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]

POLICY = ["model:=/no/such/model"]  # the checks below all come before the model is loaded
NODE_CASES = [
    # node, parameters ({cal} = a valid calibration, {dir} = a directory), what the one line must say
    ("policy_node", [], "parameter model is empty"),
    ("policy_node", POLICY, "parameter calibration is empty"),
    ("policy_node", POLICY + ["calibration:={cal}", "trigger:=often"], "parameter trigger must be one of ['timer', 'camera']"),
    ("policy_node", POLICY + ["calibration:={cal}", "blend:=max"], "parameter blend must be one of"),
    ("policy_node", POLICY + ["calibration:={cal}", "stamp_source:=clock"], "parameter stamp_source must be one of"),
    ("policy_node", POLICY + ["calibration:={cal}", "executor:=multi"], "parameter executor must be one of"),
    ("policy_node", POLICY + ["calibration:={cal}", "max_age:=0.0"], "parameter max_age must be > 0"),
    ("policy_node", POLICY + ["calibration:={cal}", "max_age:=soon"], "parameter max_age: expected a number"),
    ("policy_node", POLICY + ["calibration:={cal}", "future_tolerance:=-0.1"], "parameter future_tolerance must be >= 0"),
    ("policy_node", POLICY + ["calibration:={cal}", "velocity_scale:=0.0"], "parameter velocity_scale must be > 0"),
    ("policy_node", POLICY + ["calibration:={cal}", "control_hz:=-1.0"], "parameter control_hz must be >= 0"),
    ("policy_node", POLICY + ["calibration:={cal}", "diagnostics_period:=0.0"], "parameter diagnostics_period must be > 0"),
    ("policy_node", POLICY + ["calibration:={cal}", "task_sequence:=[1, 2]"], "parameter task_sequence: expected a list of strings"),
    ("policy_node", POLICY + ["calibration:={cal}", "enabled:=yes_please"], "parameter enabled: expected true or false"),
    ("policy_node", POLICY + ["calibration:={dir}"], "is not a file (expected a calibration YAML)"),
    ("policy_node", POLICY + ["calibration:=/no/such.yaml"], "calibration file not found: /no/such.yaml"),
    ("policy_node", POLICY + ["calibration:={cal}"], "model folder not found"),
    ("recorder_node", [], "parameter calibration is empty"),
    ("recorder_node", ["calibration:={cal}"], "parameter output is empty"),
    ("recorder_node", ["calibration:=.", "output:=x.zarr"], "calibration . is not a file"),  # was IsADirectoryError
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "command_type:=Twist"], "parameter command_type must be one of"),
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "stamp_source:=clock"], "parameter stamp_source must be one of"),
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "on_shutdown:=keep"], "parameter on_shutdown must be one of"),
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "max_age:=0.0"], "parameter max_age must be > 0"),
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "max_wait:=-1.0"], "parameter max_wait must be >= 0"),
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "future_tolerance:=-1.0"], "parameter future_tolerance must be >= 0"),
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "task_names:=[a, b, a]"], "parameter task_names has a name twice"),
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "control_hz:=fast"], "parameter control_hz: expected a number"),
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "status_period:=0.0"], "parameter status_period must be > 0"),
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "cameras:=[top]"], "parameter cameras: ['top'] not in calibration"),
    ("recorder_node", ["calibration:={cal}", "output:=x.zarr", "flush_every:=-2"], "parameter flush_every must be >= 0"),
    ("record_keyboard", ["recorder:=''"], "parameter recorder is empty"),
    ("record_keyboard", ["timeout:=0.0"], "parameter timeout must be > 0"),
    ("record_keyboard", ["timeout:=long"], "parameter timeout: expected a number"),
    ("record_keyboard", ["wait:=-1.0"], "parameter wait must be >= 0"),
    ("sim_robot_node", ["env:=nope"], "unknown env 'nope'"),
    ("sim_robot_node", ["control_hz:=fast"], "parameter control_hz: expected a number"),
    ("scripted_teleop_node", ["env:=1"], "parameter env: expected a string"),
    ("scripted_teleop_node", ["mark_wait:=-1.0"], "parameter mark_wait must be >= 0"),
]


def _one_error_line(proc: subprocess.CompletedProcess, expected: str, who: str) -> None:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-3000:]
    assert proc.returncode == 2, f"exit {proc.returncode}: {text[-2000:]}"
    # the contract's lines ("<who>: error: ..."); DDS transport warnings (e.g. shared-memory port errors after
    # other tests' SIGKILLs) may share stderr and are not counted
    lines = [line for line in proc.stderr.splitlines() if re.match(r"^([\w .-]+: )?error: ", line)]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"{who}: error:") or lines[0].startswith("error:"), lines[0]
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("node,params,expected", NODE_CASES, ids=[f"{c[0]}-{'-'.join(c[1][-1:]) or 'none'}"
                                                                  for c in NODE_CASES])
def test_node_parameter_errors_are_one_line(node, params, expected, tmp_path):
    cal = S.write_calibration(tmp_path)
    args = [p.format(cal=cal, dir=tmp_path) for p in params]
    cmd = [sys.executable, "-m", f"vqbet_ros.{node}", "--ros-args"] + [x for p in args for x in ("-p", p)]
    proc = subprocess.run(cmd, env=S.ros_env(), capture_output=True, text=True, timeout=90, cwd=tmp_path,
                          stdin=subprocess.DEVNULL)
    _one_error_line(proc, expected, node)


CLI_CASES = [
    (["train", "--config", "/no/such.yaml", "--data", "/no/d.zarr", "--out", "{tmp}/run"], "config '/no/such.yaml' not found"),
    (["export", "--checkpoint", "/no/run", "--out", "{tmp}/m"], "/no/run: not a checkpoint folder"),
    (["inspect", "/no/d.zarr"], "/no/d.zarr: dataset not found"),
    (["eval", "--model", "/no/model", "--env", "multipath", "--episodes", "1"], "/no/model: model folder not found"),
    (["sim-demos", "--env", "nope", "--episodes", "1", "--out", "{tmp}/d.zarr"], "unknown env 'nope'"),
    (["bag2zarr", "{tmp}", "--calibration", "/no/cal.yaml", "--out", "{tmp}/d.zarr"], "calibration file not found"),
    (["bag2zarr", "{tmp}", "--calibration", "{tmp}", "--out", "{tmp}/d.zarr"], "is not a file (expected a calibration YAML)"),
    (["bag2zarr", "{tmp}/nobag", "--calibration", "{cal}", "--out", "{tmp}/d.zarr", "--future-tolerance", "-1"],
     "--future-tolerance must be >= 0"),
    (["train", "--data", "/no/d.zarr", "--out", "{tmp}/run"], "the following arguments are required: --config"),
]


@pytest.mark.parametrize("argv,expected", CLI_CASES, ids=[" ".join(c[0][:1] + c[1].split()[:2]) for c in CLI_CASES])
def test_command_input_errors_are_one_line(argv, expected, tmp_path):
    cal = S.write_calibration(tmp_path)
    args = [a.format(tmp=tmp_path, cal=cal) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "vqbet_core.cli.main", *args], capture_output=True, text=True,
                          timeout=90, cwd=tmp_path, stdin=subprocess.DEVNULL)
    _one_error_line(proc, expected, f"vqbet {argv[0]}")
