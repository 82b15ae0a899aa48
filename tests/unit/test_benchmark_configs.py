"""Every benchmark env through its named config: sim-demos -> a tiny train -> eval (one JSON line).

Quality is the benchmark's job (README results); this checks that the shipped configs, datasets and
evaluators fit together for each env, with the configs' own shapes (window, chunk, codes, images) and only
the step counts and network sizes shrunk.
"""

import json

import pytest

from vqbet_core.cli.main import main as vqbet
from vqbet_core.data.store import ZarrDataset

TINY = ["--set", "train.phase1_steps=3", "--set", "train.phase2_steps=3", "--set", "train.batch_size=16",
        "--set", "train.phase1_batch_size=32", "--set", "train.log_every=1", "--set", "train.val_every=3",
        "--set", "train.ckpt_every=3", "--set", "gpt.n_layer=1", "--set", "gpt.n_head=2", "--set", "gpt.n_embd=16",
        "--set", "vq.code_dim=16", "--set", "vq.hidden=16", "--set", "heads.hidden=16", "--set", "data.val_fraction=0.0"]

CASES = {
    # config: (env, sim-demos args, extra train args, metric keys of eval)
    "blockpush": ("blockpush", [], [], {"R1", "R2", "P1", "P2", "mode_freq"}),
    "kitchen": ("kitchen", ["--env-arg", "state_velocities=false"], [], {"tasks_mean", "frac_ge_4", "order_entropy", "demo_order_entropy_at_n"}),
    "kitchen_image": ("kitchen", ["--env-arg", "image_size=32"], ["--set", "vision.weights=none", "--set", "vision.image_size=32"],
                      {"tasks_mean", "order_entropy"}),
    "pusht_image": ("pusht_image", ["--env-arg", "image_size=32"], ["--set", "vision.weights=none", "--set", "vision.image_size=32"],
                    {"final_coverage_mean", "max_coverage_mean", "success"}),
}


@pytest.mark.parametrize("config", sorted(CASES))
def test_named_config_trains_and_evaluates(config, tmp_path, capsys):
    env, demo_args, train_args, metrics = CASES[config]
    data, run = tmp_path / "demos.zarr", tmp_path / "run"
    assert vqbet(["sim-demos", "--env", env, "--episodes", "2", "--out", str(data), "--seed", "3", "--no-progress",
                  *demo_args]) == 0
    capsys.readouterr()
    assert vqbet(["train", "--config", config, "--data", str(data), "--out", str(run), "--no-progress", *TINY,
                  *train_args]) == 0
    err = capsys.readouterr().err
    assert "it/s" not in err and "batch/s" not in err, f"{config}: --no-progress still drew a bar: {err[-300:]}"
    assert vqbet(["eval", "--checkpoint", str(run), "--env", env, "--episodes", "1", "--max-steps", "8"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["env"] == env and result["episodes"] == 1
    # the evaluation scene is the recorded one, whole (every constructor argument), and nothing was said about it
    assert result["env_args"] == ZarrDataset.open(data).attrs["env_args"], f"{config}: eval changed the scene"
    assert "vqbet eval:" not in err, err
    assert metrics <= set(result), f"{config}: eval lacks {metrics - set(result)}"


def test_eval_rebuilds_the_scene_of_demos_that_predate_an_env_option(tmp_path, capsys):
    """Blockpush demos recorded before ``target_layout`` existed were made on the random layout: eval says so and uses it."""
    import zarr

    data, run = tmp_path / "demos.zarr", tmp_path / "run"
    assert vqbet(["sim-demos", "--env", "blockpush", "--episodes", "2", "--out", str(data), "--seed", "3",
                  "--no-progress", "--env-arg", "target_layout=random"]) == 0
    root = zarr.open_group(str(data), mode="r+")
    old = {k: v for k, v in root.attrs.asdict().items() if k != "target_layout"}
    old["env_args"] = {}
    root.attrs.put(old)  # as sim-demos wrote them before the option
    capsys.readouterr()
    assert vqbet(["train", "--config", "blockpush", "--data", str(data), "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert vqbet(["eval", "--checkpoint", str(run), "--env", "blockpush", "--episodes", "1", "--max-steps", "3"]) == 0
    out, err = capsys.readouterr()
    assert "no record of blockpush's target_layout option (they predate it); evaluating with target_layout='random'" in err
    assert json.loads(out.strip().splitlines()[-1])["env_args"]["target_layout"] == "random"
    assert vqbet(["eval", "--checkpoint", str(run), "--env", "blockpush", "--episodes", "1", "--max-steps", "3",
                  "--env-arg", "target_layout=paper"]) == 0
    out, err = capsys.readouterr()
    assert "predate" not in err  # the user's choice wins, and the difference is named with both values
    assert "differs from the training demos': target_layout='paper' (demos: 'random')" in err
    assert json.loads(out.strip().splitlines()[-1])["env_args"]["target_layout"] == "paper"


def test_a_checkpoint_keeps_the_recorded_scene_whole(tmp_path, capsys):
    """The README's blockpush bug: the checkpoint kept a whitelist of attrs without target_layout, so eval took
    the demos for ones that predate it and ran on the random layout. Every attribute now reaches eval."""
    from vqbet_core.train.checkpoint import load_meta

    data, run = tmp_path / "demos.zarr", tmp_path / "run"
    assert vqbet(["sim-demos", "--env", "blockpush", "--episodes", "2", "--out", str(data), "--seed", "3",
                  "--no-progress"]) == 0
    assert vqbet(["train", "--config", "blockpush", "--data", str(data), "--out", str(run), "--no-progress", *TINY]) == 0
    assert load_meta(run)[1]["dataset_attrs"] == ZarrDataset.open(data).attrs
    capsys.readouterr()
    assert vqbet(["eval", "--checkpoint", str(run), "--env", "blockpush", "--episodes", "1", "--max-steps", "3"]) == 0
    out, err = capsys.readouterr()
    assert "vqbet eval:" not in err, err
    assert json.loads(out.strip().splitlines()[-1])["env_args"]["target_layout"] == "paper"
