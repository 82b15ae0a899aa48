"""Goal-conditioned long-horizon kitchen in CI time: demos with task_index -> tiny kitchen_goal train ->
export (completion output parity-checked) -> eval with a requested subtask order, both advance modes.

Quality is the benchmark's job (README results); this checks that every piece fits and is real.
"""

import json

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")
pytest.importorskip("mujoco")

from vqbet_core.cli.main import main as vqbet  # noqa: E402
from vqbet_core.data.store import ZarrDataset  # noqa: E402
from vqbet_core.data.tasks import marks_from_task_index  # noqa: E402

TINY = ["--set", "train.phase1_steps=3", "--set", "train.phase2_steps=4", "--set", "train.batch_size=16",
        "--set", "train.phase1_batch_size=32", "--set", "train.log_every=1", "--set", "train.val_every=4",
        "--set", "train.ckpt_every=4", "--set", "gpt.n_layer=1", "--set", "gpt.n_head=2", "--set", "gpt.n_embd=16",
        "--set", "vq.code_dim=16", "--set", "vq.hidden=16", "--set", "heads.hidden=16", "--set", "data.val_fraction=0.0"]


@pytest.fixture(scope="module")
def goal_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kitchen_goal")
    data, run, model = tmp / "demos.zarr", tmp / "run", tmp / "model"
    assert vqbet(["sim-demos", "--env", "kitchen", "--episodes", "2", "--out", str(data), "--seed", "3",
                  "--no-progress", "--env-arg", "state_velocities=false"]) == 0
    assert vqbet(["train", "--config", "kitchen_goal", "--data", str(data), "--out", str(run), "--no-progress", *TINY]) == 0
    assert vqbet(["export", "--checkpoint", str(run), "--out", str(model)]) == 0
    return data, run, model


def test_demos_label_every_step_with_the_subtask_the_env_completed_next(goal_run):
    ds = ZarrDataset.open(goal_run[0])
    names = ds.attrs["task_names"]
    ti = ds.read("task_index")
    assert ti.dtype == np.int64 and len(ti) == ds.n_steps and (ti >= 0).all()
    start = 0
    for end, mode in zip(ds.episode_ends, ds.attrs["episode_modes"]):
        marks = marks_from_task_index(ti[start:end], names)
        assert [name for _, name in marks] == mode.split(">")  # the env's completion order, switch by switch
        assert marks[-1][0] == end - start - 1  # the episode ends at the step its last subtask completed
        start = int(end)


def test_export_names_one_goal_per_subtask_and_checks_the_completion_output(goal_run, capsys):
    import yaml

    _, _, model = goal_run
    meta = yaml.safe_load((model / "model.yaml").read_text())
    assert sorted(meta["goal_names"]) == sorted(ZarrDataset.open(goal_run[0]).attrs["task_names"])
    assert meta["completion"] == {"horizon": 1, "output": "completion"}
    assert meta["export"]["parity"]["completion_max_abs_error"] < 1e-4


def test_runtime_switches_goal_and_keeps_its_history(goal_run):
    from vqbet_core.runtime.agent import RuntimeAgent

    agent = RuntimeAgent(goal_run[2], seed=0)
    agent.reset("microwave")
    obs = {k: np.zeros(d, np.float32) for k, d in agent.model.obs_dims.items()}
    agent.act(obs)
    score = agent.completion
    assert score is not None and 0.0 <= score <= 1.0
    agent.set_goal("light switch")
    assert len(agent.runtime.history) == 1 and agent.runtime.goal_name == "light switch"
    assert agent.runtime.goal.tolist() == [agent.model.goal_vectors["light switch"].tolist()]  # one-hot, not rescaled
    agent.act(obs)
    assert agent.completion is not None and len(agent.runtime.history) == 2


@pytest.mark.parametrize("advance", ["model", "oracle"])
def test_eval_asks_for_a_requested_order(goal_run, capsys, advance):
    _, run, model = goal_run
    assert vqbet(["eval", "--model", str(model), "--env", "kitchen", "--episodes", "2", "--max-steps", "12",
                  "--task-sequence", "random", "--advance", advance, "--completion-threshold", "0.01"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["task_sequence"] == "random" and out["advance"] == advance and out["sequence_length"] == 4
    assert out["episodes_seen"] + out["episodes_unseen"] == 2 and 0 <= out["in_order_mean"] <= 4
    if advance == "model":  # threshold 0.01: the untrained head fires, so advances happen and are scored
        assert out["advances"] > 0 and out["completion_precision"] is not None
    assert vqbet(["eval", "--checkpoint", str(run), "--env", "kitchen", "--episodes", "1", "--max-steps", "5",
                  "--task-sequence", "microwave,light switch", "--advance", advance]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sequence_length"] == 2


@pytest.mark.parametrize("argv, needle", [
    (["--task-sequence", "microwave,oven"], "unknown subtask(s) ['oven']"),
    (["--task-sequence", "microwave,microwave"], "appears twice"),
    (["--task-sequence", ","], "empty list"),
    (["--task-sequence", "random", "--completion-threshold", "2"], "--completion-threshold"),
])
def test_bad_sequences_are_one_line_errors(goal_run, capsys, argv, needle):
    code = vqbet(["eval", "--model", str(goal_run[2]), "--env", "kitchen", "--episodes", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_a_model_without_subtask_goals_refuses_a_sequence(tmp_path, capsys):
    data, run = tmp_path / "d.zarr", tmp_path / "run"
    assert vqbet(["sim-demos", "--env", "multipath", "--episodes", "3", "--out", str(data), "--no-progress"]) == 0
    assert vqbet(["train", "--config", "multipath", "--data", str(data), "--out", str(run), "--no-progress", *TINY]) == 0
    capsys.readouterr()
    code = vqbet(["eval", "--checkpoint", str(run), "--env", "multipath", "--episodes", "1", "--task-sequence", "random"])
    err = capsys.readouterr().err
    assert code == 2 and "not goal-conditioned on subtasks" in err and err.count("\n") == 1


def test_finished_windows_show_the_done_subtask_as_goal(goal_run):
    """completion.after: windows just past a subtask's end carry that subtask's goal and done = 1 after its end."""
    import torch

    from vqbet_core.config import load_config
    from vqbet_core.data.tasks import finished_subtask
    from vqbet_core.train.data import TrainingData

    data, _, _ = goal_run
    cfg = load_config("kitchen_goal", {"data": {"val_fraction": 0.0}})
    td = TrainingData(cfg, data, torch.device("cpu"), progress=False)
    task, end_at = finished_subtask(td.task_index, td.episode_ends, 10)
    b = td.random_batch(td.train, 32, np.random.default_rng(0))
    obs, goal, done = b.finished
    assert obs.shape == (8, cfg["obs_window"], td.obs_dim) and goal.shape == (8, td.goal_dim) and done.shape == (8, 10)
    eligible = td._finished_windows(td.train)
    assert len(eligible) and (task[td.train.indices(eligible)[0][:, -1]] >= 0).all()
    for k in eligible[:20]:
        o, g, d = td.finished_batch(td.train, np.array([k]))
        last = td.train.indices(np.array([k]))[0][0]
        assert int(g[0].argmax()) == task[last[-1]] != td.task_index[last[-1]]  # the finished one, not the current
        assert torch.equal(torch.isnan(d[0]), torch.as_tensor(last <= end_at[last[-1]]))  # its own steps: unscored
        assert (d[0][~torch.isnan(d[0])] == 1).all()


def test_task_state_dims_are_where_the_env_judges_each_completion(goal_run):
    """sim-demos keeps, per subtask, the state dims its completion is judged on: not done where the subtask
    starts, done on the first step past its end (the official threshold on exactly those dims)."""
    from vqbet_core.sim.kitchen import BONUS_THRESH, OBS_ELEMENT_GOALS

    ds = ZarrDataset.open(goal_run[0])
    dims = ds.attrs["task_state_dims"]["state"]
    names, state, ti = ds.attrs["task_names"], ds.read("state"), ds.read("task_index")
    assert sorted(dims) == sorted(names)
    checked, start = 0, 0
    for end in ds.episode_ends:
        for step, name in marks_from_task_index(ti[start:end], names):
            first = start + int(np.nonzero(ti[start:end] == names.index(name))[0][0])
            assert np.linalg.norm(state[first, dims[name]] - OBS_ELEMENT_GOALS[name]) >= BONUS_THRESH
            if start + step + 1 < end:  # the episode's last subtask has no step past its end
                assert np.linalg.norm(state[start + step + 1, dims[name]] - OBS_ELEMENT_GOALS[name]) < BONUS_THRESH
                checked += 1
        start = int(end)
    assert checked >= 4


def test_unmoved_windows_put_the_subtask_object_back_and_say_not_done(goal_run):
    """completion.unmoved: windows around a subtask's end, its object's dims at their start values on every
    step, that subtask as goal, done = 0 on its steps (NaN on an earlier subtask's)."""
    import torch

    from vqbet_core.config import load_config
    from vqbet_core.train.data import TrainingData

    data, _, _ = goal_run
    cfg = load_config("kitchen_goal", {"data": {"val_fraction": 0.0}, "completion": {"unmoved": 0.25}})
    td = TrainingData(cfg, data, torch.device("cpu"), progress=False)
    b = td.random_batch(td.train, 32, np.random.default_rng(0))
    assert b.finished[0].shape[0] == 8 + 8  # completion.after windows, then the unmoved ones
    eligible = td._unmoved_windows(td.train)
    obs_idx = td.train.indices(eligible)[0]
    obs, goal, done = td.unmoved_batch(td.train, eligible)
    original = td.obs[torch.as_tensor(obs_idx)]
    for row in range(len(eligible)):
        k, first = td.near_task[obs_idx[row, -1]], td.near_start[obs_idx[row, -1]]
        cols = td.unmoved_cols[k]
        assert int(goal[row].argmax()) == k
        assert torch.equal(obs[row][:, cols], td.obs[first, cols].expand(obs.shape[1], -1))
        rest = torch.ones(td.obs_dim, dtype=torch.bool)
        rest[cols] = False
        assert torch.equal(obs[row][:, rest], original[row][:, rest])  # the arm and other objects as recorded
        scored = torch.as_tensor(obs_idx[row] >= first)
        assert torch.equal(~torch.isnan(done[row]), scored) and (done[row][scored] == 0).all()
    moved = (original - obs).abs().sum(dim=(0, 1)) > 0
    assert moved.any()  # at least one window had its object moved before the reset


def test_unmoved_needs_the_recorded_dims(goal_run, tmp_path):
    import shutil

    import torch

    from vqbet_core.config import load_config
    from vqbet_core.errors import DatasetError
    from vqbet_core.train.data import TrainingData

    copy = tmp_path / "no_dims.zarr"
    shutil.copytree(goal_run[0], copy)
    ds = ZarrDataset.open(copy, "a")
    ds.update_attrs({"task_state_dims": None})
    cfg = load_config("kitchen_goal", {"data": {"val_fraction": 0.0}, "completion": {"unmoved": 0.25}})
    with pytest.raises(DatasetError, match="task_state_dims"):
        TrainingData(cfg, copy, torch.device("cpu"), progress=False)


def test_the_head_stage_refits_the_completion_head_and_keeps_the_policy(goal_run, tmp_path, head_stage_kept_policy):
    """kitchen_goal_head --init-from a kitchen_goal run (whose head read the GPT feature only): the GPT and
    action heads carry over unchanged (nothing but the head trains), the obs_input head starts anew."""
    data, run, _ = goal_run
    out = tmp_path / "obs_head"
    assert vqbet(["train", "--config", "kitchen_goal_head", "--data", str(data), "--out", str(out), "--no-progress",
                  "--init-from", str(run), *TINY]) == 0
    head_stage_kept_policy(run, out)
    import yaml

    model = tmp_path / "obs_head_model"
    assert vqbet(["export", "--checkpoint", str(out), "--out", str(model)]) == 0  # the head's obs input is in policy.onnx
    meta = yaml.safe_load((model / "model.yaml").read_text())
    assert meta["export"]["parity"]["completion_max_abs_error"] < 1e-4
