"""Every benchmark env through its named config: sim-demos -> a tiny train -> eval (one JSON line).

Quality is the benchmark's job (README results); this checks that the shipped configs, datasets and
evaluators fit together for each env, with the configs' own shapes (window, chunk, codes, images) and only
the step counts and network sizes shrunk.
"""

import json

import pytest

from vqbet_core.cli.main import main as vqbet

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
    assert vqbet(["train", "--config", config, "--data", str(data), "--out", str(run), *TINY, *train_args]) == 0
    capsys.readouterr()
    assert vqbet(["eval", "--checkpoint", str(run), "--env", env, "--episodes", "1", "--max-steps", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["env"] == env and result["episodes"] == 1
    assert metrics <= set(result), f"{config}: eval lacks {metrics - set(result)}"
