"""completion.unmoved for camera policies: demo steps near a subtask's end re-rendered by the kitchen with that
subtask's object put back where it started (vqbet_core/vision/unmoved_frames.py), real MuJoCo rendering."""

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")
pytest.importorskip("mujoco")

from vqbet_core.cli.main import main as vqbet  # noqa: E402
from vqbet_core.data.store import ZarrDataset  # noqa: E402
from vqbet_core.vision.unmoved_frames import unmoved_steps  # noqa: E402

# kitchen_goal_head's changes on kitchen_image_goal (docs/explanation/benchmarks.md, the image head stage)
HEAD_STAGE = ["--set", "completion.obs_input=true", "--set", "completion.unmoved=0.25", "--set", "loss.offset=0.0",
              "--set", "bet.offset_weight=0.0", "--set", "train.offset_only_after=0"]
SMALL = {"data": {"val_fraction": 0.0}, "vision": {"weights": "none", "image_size": 32}, "obs_window": 4,
         "completion": {"unmoved": 0.25, "obs_input": True}}


@pytest.fixture(scope="module")
def image_demos(tmp_path_factory):
    data = tmp_path_factory.mktemp("kitchen_image_goal") / "demos.zarr"
    assert vqbet(["sim-demos", "--env", "kitchen", "--episodes", "1", "--out", str(data), "--seed", "3",
                  "--no-progress", "--env-arg", "image_size=32", "--env-arg", "state_velocities=false"]) == 0
    return data


def test_unmoved_steps_cover_each_window_from_the_subtask_start():
    near_task = np.array([-1, -1, -1, 0, 0, 0, 0, -1])  # subtask 0 started at step 1, ends near step 3..6
    near_start = np.array([-1, -1, -1, 1, 1, 1, 1, -1])
    steps, tasks, starts = unmoved_steps(near_task, near_start, window=3)
    assert steps.tolist() == [1, 2, 3, 4, 5, 6]  # step 3's window is 1..3; step 0 is before the subtask: not shown
    assert set(tasks.tolist()) == {0} and set(starts.tolist()) == {1}
    assert [len(a) for a in unmoved_steps(np.full(4, -1), np.full(4, -1), 3)] == [0, 0, 0]


def test_a_recorded_state_renders_the_recorded_frame_and_leaves_the_env_alone(image_demos):
    from vqbet_core.sim.kitchen import KitchenEnv

    ds = ZarrDataset.open(image_demos)
    env = KitchenEnv(**ds.attrs["env_args"])
    try:
        env.reset(seed=0)
        before = env.data.qpos.copy()
        state, frames = ds.read("state"), ds.read("camera_front")
        for i in (0, ds.n_steps // 2, ds.n_steps - 1):
            diff = np.abs(env.render_state(state[i]).astype(int) - frames[i]).mean()
            assert diff < 3.0, f"step {i}: re-rendered frame differs by {diff:.2f} grey levels on average"
        assert np.array_equal(env.data.qpos, before)
        from vqbet_core.errors import VqbetError

        with pytest.raises(VqbetError, match="expected 30"):
            env.render_state(np.zeros(7))
    finally:
        env.close()


def test_image_unmoved_windows_show_the_object_back_where_it_started(image_demos, tmp_path):
    """Camera features change on the window's steps of the subtask (object moved back), the joints do not,
    steps before the subtask stay as recorded, the subtask is the goal and done = 0 where scored."""
    import torch

    from vqbet_core.config import load_config
    from vqbet_core.train.data import TrainingData
    from vqbet_core.vision.encoder import build_encoder

    cfg = load_config("kitchen_image_goal", SMALL)
    encoder = build_encoder(cfg["vision"])
    td = TrainingData(cfg, image_demos, torch.device("cpu"), cache_dir=tmp_path / "features", encoder=encoder, progress=False)
    assert td.unmoved_obs is not None and not td.unmoved_cols  # the joints carry no object dims: rendered path
    eligible = td._unmoved_windows(td.train)
    obs_idx = td.train.indices(eligible)[0]
    obs, goal, done = td.unmoved_batch(td.train, eligible)
    original = td.obs[torch.as_tensor(obs_idx)]
    joints = slice(0, 9)  # fusion order: low-dim keys first (robot_joint), then camera features
    assert torch.equal(obs[:, :, joints], original[:, :, joints])
    changed_at_end = 0
    for row in range(len(eligible)):
        last = obs_idx[row, -1]
        k, first = td.near_task[last], td.near_start[last]
        assert int(goal[row].argmax()) == k
        shown = torch.as_tensor(obs_idx[row] >= first)
        assert torch.equal(obs[row][~shown], original[row][~shown])
        assert torch.equal(~torch.isnan(done[row]), shown) and (done[row][shown] == 0).all()
        changed_at_end += int(not torch.allclose(obs[row, -1], original[row, -1]))
    assert changed_at_end > len(eligible) // 2  # near a subtask's end its object has moved: the frame differs
    b = td.random_batch(td.train, 16, np.random.default_rng(0))
    assert b.finished[0].shape[0] == 4 + 4  # completion.after windows, then the unmoved ones
    # the second build reads the rendered features from the cache
    again = TrainingData(cfg, image_demos, torch.device("cpu"), cache_dir=tmp_path / "features", encoder=encoder,
                         progress=False)
    assert torch.equal(again.unmoved_obs, td.unmoved_obs)


def test_a_recording_without_a_simulator_is_a_one_line_error(image_demos, tmp_path):
    import shutil

    import torch

    from vqbet_core.config import load_config
    from vqbet_core.errors import DatasetError
    from vqbet_core.train.data import TrainingData
    from vqbet_core.vision.encoder import build_encoder

    copy = tmp_path / "robot.zarr"
    shutil.copytree(image_demos, copy)
    ZarrDataset.open(copy, "a").update_attrs({"source": "ros2:recorder"})
    cfg = load_config("kitchen_image_goal", SMALL)
    with pytest.raises(DatasetError, match="cannot be re-rendered") as err:
        TrainingData(cfg, copy, torch.device("cpu"), cache_dir=tmp_path / "features", encoder=build_encoder(cfg["vision"]),
                     progress=False)
    assert "\n" not in str(err.value)


def test_the_image_head_stage_trains_from_a_run_and_exports_its_head(image_demos, tmp_path, head_stage_kept_policy):
    """The head-only stage (as kitchen_goal_head) on a camera config, --init-from a tiny kitchen_image_goal run:
    the policy carries over unchanged, the new head (camera features + joints + goal in) is in policy.onnx and
    matches torch."""
    import yaml

    tiny = ["--no-progress", "--set", "vision.weights=none", "--set", "vision.image_size=32", "--set", "obs_window=4",
            "--set", "train.phase1_steps=3", "--set", "train.phase2_steps=3", "--set", "train.batch_size=8",
            "--set", "train.phase1_batch_size=32", "--set", "train.val_every=3", "--set", "train.ckpt_every=3",
            "--set", "gpt.n_layer=1", "--set", "gpt.n_head=2", "--set", "gpt.n_embd=16", "--set", "vq.code_dim=16",
            "--set", "vq.hidden=16", "--set", "heads.hidden=16", "--set", "data.val_fraction=0.0"]
    run, head, model = tmp_path / "run", tmp_path / "head", tmp_path / "model"
    assert vqbet(["train", "--config", "kitchen_image_goal", "--data", str(image_demos), "--out", str(run), *tiny]) == 0
    assert vqbet(["train", "--config", "kitchen_image_goal", "--data", str(image_demos), "--out", str(head),
                  "--init-from", str(run), *HEAD_STAGE, *tiny]) == 0
    head_stage_kept_policy(run, head)
    assert vqbet(["export", "--checkpoint", str(head), "--out", str(model)]) == 0
    meta = yaml.safe_load((model / "model.yaml").read_text())
    assert meta["export"]["parity"]["completion_max_abs_error"] < 1e-4
