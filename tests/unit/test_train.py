"""Trainer: both phases, checkpoints (safetensors + YAML, no pickle), resume, config mismatch, CLI errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vqbet_core.cli.main import main as vqbet
from vqbet_core.config import load_config
from vqbet_core.data.store import ZarrDataset
from vqbet_core.errors import CheckpointError
from vqbet_core.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def two_mode_dataset(path: Path, episodes: int = 16, length: int = 30) -> Path:
    """Point moving right, then up or down (two modes), as a tiny zarr dataset."""
    rng = np.random.default_rng(0)
    ds = ZarrDataset.create(path, {"source": "test", "episode_modes": []})
    modes = []
    for e in range(episodes):
        up = e % 2 == 0
        pos = np.zeros(2, np.float32)
        states, actions = [], []
        for t in range(length):
            a = np.array([0.1, 0.0], np.float32) if t < length // 2 else np.array([0.0, 0.1 if up else -0.1], np.float32)
            a = a + rng.normal(0, 0.005, 2).astype(np.float32)
            states.append(pos.copy())
            actions.append(a)
            pos = pos + a
        ds.add_episode({"state": np.stack(states), "action": np.stack(actions),
                        "timestamp": np.arange(length, dtype=np.float64) / 10})
        modes.append("up" if up else "down")
    ds.update_attrs({"episode_modes": modes})
    return path


def tiny_cfg(policy="vqbet", **train):
    cfg = load_config("multipath", {"policy": policy,
                                    "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 32},
                                    "vq": {"code_dim": 16, "hidden": 32, "n_codes": 4},
                                    "heads": {"hidden": 32}, "bet": {"n_bins": 4},
                                    "train": {"phase1_steps": 20, "phase2_steps": 10, "batch_size": 32,
                                              "phase1_batch_size": 64, "log_every": 5, "val_every": 10,
                                              "ckpt_every": 10, "device": "cpu", **train}})
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return two_mode_dataset(tmp_path_factory.mktemp("d") / "two.zarr")


@pytest.mark.parametrize("policy", ["vqbet", "bet"])
def test_train_writes_safe_checkpoint_metrics_and_plot(tmp_path, data, policy):
    run = tmp_path / "run"
    meta = Trainer(tiny_cfg(policy), data, run, progress=False).run()
    assert meta["phase1_step"] == 20 and meta["phase2_step"] == 10
    ck = run / "checkpoint"
    assert {"model.safetensors", "normalizer.safetensors", "meta.yaml"} <= {p.name for p in ck.iterdir()}
    assert not [p for p in run.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".pickle")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["phase"] == 2 and "loss" in r for r in records)
    if policy == "vqbet":
        assert any(r["phase"] == 1 and "loss" in r for r in records)
    assert (run / "loss.png").stat().st_size > 1000


def test_resume_continues_phase2_without_redoing_phase1(tmp_path, data):
    run = tmp_path / "run"
    Trainer(tiny_cfg(), data, run, progress=False).run()
    before = load_file(str(run / "checkpoint" / "model.safetensors"))
    tok_keys = [k for k in before if k.startswith("tokenizer")]
    assert tok_keys
    meta = Trainer(tiny_cfg(phase2_steps=25), data, run, progress=False).run()
    assert meta["phase1_step"] == 20 and meta["phase2_step"] == 25
    after = load_file(str(run / "checkpoint" / "model.safetensors"))
    for k in tok_keys:  # frozen tokenizer untouched by resumed phase 2
        assert torch.equal(before[k], after[k]), k
    phase2_steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["phase"] == 2]
    assert max(phase2_steps) == 25 and 15 in phase2_steps


def test_resume_refuses_a_different_model_config(tmp_path, data):
    run = tmp_path / "run"
    Trainer(tiny_cfg(), data, run, progress=False).run()
    other = tiny_cfg()
    other["gpt"]["n_embd"] = 64
    with pytest.raises(CheckpointError, match="different model"):
        Trainer(other, data, run, progress=False)
    Trainer(other, data, run, fresh=True, progress=False).run()  # --fresh starts over


def test_init_from_reuses_tokenizer_and_gpt_and_trains_only_the_offsets(tmp_path, data):
    """``--init-from`` with ``offset_only_after=0``: another offset loss on a finished run's tokenizer + GPT."""
    src = tmp_path / "src"
    Trainer(tiny_cfg(), data, src, progress=False).run()
    before = load_file(str(src / "checkpoint" / "model.safetensors"))
    cfg = tiny_cfg(phase2_steps=15, offset_only_after=0.0)
    cfg["loss"]["offset_codes"] = "both"
    meta = Trainer(cfg, data, tmp_path / "ft", progress=False, init_from=src).run()
    assert meta["phase1_step"] == 20 and meta["phase2_step"] == 15 and meta["init_from"] == str(src.resolve())
    after = load_file(str(tmp_path / "ft" / "checkpoint" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("offset_head") for k in changed), changed
    src_norm = load_file(str(src / "checkpoint" / "normalizer.safetensors"))
    ft_norm = load_file(str(tmp_path / "ft" / "checkpoint" / "normalizer.safetensors"))
    assert all(torch.equal(src_norm[k], ft_norm[k]) for k in src_norm)
    phase1 = [json.loads(l) for l in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines() if json.loads(l)["phase"] == 1]
    assert not any("loss" in r for r in phase1)  # the tokenizer was not trained again


def test_init_from_bad_sources_are_one_line_errors(tmp_path, data, capsys):
    with pytest.raises(CheckpointError, match="not a run folder"):
        Trainer(tiny_cfg(), data, tmp_path / "ft", progress=False, init_from=tmp_path / "nothing")
    src = tmp_path / "src"
    Trainer(tiny_cfg(), data, src, progress=False).run()
    with pytest.raises(CheckpointError, match="'vqbet' run"):
        Trainer(tiny_cfg("bet"), data, tmp_path / "ft", progress=False, init_from=src)
    wider = tiny_cfg()
    wider["gpt"]["n_embd"] = 64
    with pytest.raises(CheckpointError, match="do not fit"):
        Trainer(wider, data, tmp_path / "ft2", progress=False, init_from=src)
    assert vqbet(["train", "--config", "multipath", "--data", str(data), "--out", str(tmp_path / "r"),
                  "--init-from", str(tmp_path / "nothing")]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "--init-from" in err[0]


def test_agent_from_checkpoint_is_deterministic_under_seed(tmp_path, data):
    from vqbet_core.agent import TorchAgent

    run = tmp_path / "run"
    Trainer(tiny_cfg(), data, run, progress=False).run()
    outs = []
    for _ in range(2):
        agent = TorchAgent(run, seed=3)
        agent.reset()
        outs.append(np.stack([agent.act({"state": np.array([0.1 * t, 0.0], np.float32)}) for t in range(6)]))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert outs[0].shape == (6, 2) and np.all(np.isfinite(outs[0]))


def _errors(capsys) -> list[str]:
    """stderr lines, less the one-line metadata warning (this test data has no joint_names / control_hz)."""
    lines = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) <= 1, warnings
    return [line for line in lines if not line.startswith("warning:")]


def test_cli_errors_are_one_line(tmp_path, data, capsys):
    assert vqbet(["train", "--config", "no_such_config", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "no_such_config" in err[0]
    assert vqbet(["train", "--config", "multipath", "--data", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "r")]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "missing.zarr" in err[0]
    assert vqbet(["train", "--config", "multipath", "--data", str(data), "--out", str(tmp_path / "r"), "--set", "data.obs_keys=[nope]"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "nope" in err[0]


def test_torchrun_data_parallel_on_cpu(tmp_path, data):
    """Two gloo ranks train together; rank 0 writes the checkpoint."""
    cfg = tiny_cfg()
    cfg_path = tmp_path / "tiny.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                           "-m", "vqbet_core.cli.main", "train", "--config", str(cfg_path), "--data", str(data),
                           "--out", str(tmp_path / "ddp"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ddp" / "checkpoint" / "meta.yaml").exists()
    assert proc.stdout.count('"phase2_step": 10') == 1  # only rank 0 reports


def test_a_config_starts_from_its_base_and_changes_only_what_it_names(tmp_path):
    from vqbet_core.errors import ConfigError

    head = load_config("kitchen_goal_head")
    goal = load_config("kitchen_goal")
    assert head["name"] == "kitchen_goal_head" and head["completion"]["obs_input"] is True
    assert head["data"] == goal["data"] and head["gpt"] == goal["gpt"] and head["vq"] == goal["vq"]
    assert head["train"]["offset_only_after"] == 0 and head["train"]["phase1_steps"] == goal["train"]["phase1_steps"]
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {tmp_path / 'parent.yaml'}\nobs_window: 3\n")
    (tmp_path / "parent.yaml").write_text("base: multipath\nobs_window: 7\naction_chunk: 2\n")
    cfg = load_config(str(child))
    assert cfg["obs_window"] == 3 and cfg["action_chunk"] == 2 and cfg["data"] == load_config("multipath")["data"]
    (tmp_path / "parent.yaml").write_text(f"base: {child}\n")
    with pytest.raises(ConfigError, match="name it again"):
        load_config(str(child))
    child.write_text("base: [kitchen]\n")
    with pytest.raises(ConfigError, match="base must be a config name"):
        load_config(str(child))


def test_a_head_only_stage_without_a_run_to_start_from_is_refused(tmp_path, data, capsys):
    from vqbet_core.errors import ConfigError

    with pytest.raises(ConfigError, match="--init-from"):
        Trainer(tiny_cfg(offset_only_after=0.0), data, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
