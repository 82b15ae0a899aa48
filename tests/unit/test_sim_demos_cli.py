"""``vqbet sim-demos``: the store it writes (keys, lengths, attrs, labels), --append, reproducibility, errors."""

import json

import numpy as np
import pytest

from vqbet_core.cli.main import main as vqbet
from vqbet_core.data.store import ZarrDataset
from vqbet_core.sim.multipath import MultipathEnv, label_trajectory


def sim_demos(capsys, *argv):
    code = vqbet(["sim-demos", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    return json.loads(lines[0])


@pytest.fixture
def fork_store(tmp_path, capsys):
    path = tmp_path / "fork.zarr"
    code, out, err = sim_demos(capsys, "--env", "multipath", "--episodes", "6", "--out", str(path), "--seed", "3")
    assert code == 0, err
    return path, last_json(out)


def test_writes_a_valid_store(fork_store):
    path, summary = fork_store
    assert summary["env"] == "multipath" and summary["episodes"] == 6 and summary["out"] == str(path)
    assert summary["attempts"] == 6 and summary["expert_success_rate"] == 1.0
    assert set(summary["mode_freq"]) <= {"up", "down"} and sum(summary["mode_freq"].values()) == pytest.approx(1)

    ds = ZarrDataset.open(path, "r")
    ds.validate(["state", "action", "timestamp"])
    assert ds.n_episodes == 6 and ds.keys == ["action", "state", "timestamp"]
    assert ds.array("state").dtype == np.float32 and ds.array("state").shape[1:] == (2,)
    assert ds.array("action").dtype == np.float32 and ds.array("action").shape[1:] == (2,)
    lengths = np.diff(np.concatenate([[0], ds.episode_ends]))
    assert (lengths > 20).all() and (lengths < MultipathEnv().max_steps).all()

    attrs = ds.attrs
    assert attrs["source"] == "sim:multipath" and attrs["variant"] == "fork" and attrs["control_hz"] == 10
    assert attrs["obs_keys"] == ["state"] and attrs["env"] == "multipath" and attrs["env_args"]["variant"] == "fork"
    assert len(attrs["episode_modes"]) == 6 and len(attrs["episode_seeds"]) == 6
    freq = {m: attrs["episode_modes"].count(m) / 6 for m in set(attrs["episode_modes"])}
    assert freq == pytest.approx(summary["mode_freq"])

    env = MultipathEnv()
    for e in range(6):
        ep = ds.episode(e)
        np.testing.assert_allclose(ep["timestamp"], np.arange(len(ep["action"])) / 10.0)
        # the stored state/action pairs are a real trajectory: state[t+1] = state[t] + action[t] (free space)
        np.testing.assert_allclose(ep["state"][1:], ep["state"][:-1] + ep["action"][:-1], atol=1e-5)
        # the label matches the stored trajectory, and the stored seed replays the episode exactly
        final = ep["state"][-1] + ep["action"][-1]
        assert label_trajectory(np.vstack([ep["state"], final]), "fork") == attrs["episode_modes"][e]
        obs = env.reset(seed=attrs["episode_seeds"][e])
        np.testing.assert_array_equal(obs["state"], ep["state"][0])


def test_same_seed_same_dataset(tmp_path, capsys, fork_store):
    path, _ = fork_store
    other = tmp_path / "again.zarr"
    assert sim_demos(capsys, "--env", "multipath", "--episodes", "6", "--out", str(other), "--seed", "3")[0] == 0
    a, b = ZarrDataset.open(path), ZarrDataset.open(other)
    np.testing.assert_array_equal(a.episode_ends, b.episode_ends)
    np.testing.assert_array_equal(a.read("action"), b.read("action"))


def test_append_adds_new_episodes(fork_store, capsys):
    path, _ = fork_store
    before = ZarrDataset.open(path)
    old_actions = before.read("action")
    old_seeds = before.attrs["episode_seeds"]
    code, out, err = sim_demos(capsys, "--env", "multipath", "--episodes", "3", "--out", str(path), "--seed", "3", "--append")
    assert code == 0, err
    summary = last_json(out)
    assert summary["episodes"] == 3 and summary["total_episodes"] == 9
    ds = ZarrDataset.open(path)
    ds.validate()
    assert ds.n_episodes == 9 and len(ds.attrs["episode_modes"]) == 9
    np.testing.assert_array_equal(ds.read("action")[: len(old_actions)], old_actions)
    seeds = ds.attrs["episode_seeds"]
    assert seeds[:6] == old_seeds and len(set(seeds)) == 9  # continued, not repeated


def test_existing_out_without_append_is_an_error(fork_store, capsys):
    path, _ = fork_store
    code, out, err = sim_demos(capsys, "--env", "multipath", "--episodes", "2", "--out", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "already exists" in err and "--append" in err
    assert ZarrDataset.open(path).n_episodes == 6


def test_append_with_a_different_variant_is_refused(fork_store, capsys):
    path, _ = fork_store
    code, _, err = sim_demos(capsys, "--env", "multipath", "--episodes", "2", "--out", str(path), "--append",
                             "--env-arg", "variant=zpaths")
    assert code == 2 and err.count("\n") == 1 and "variant" in err


def test_env_args_are_parsed_and_stored(tmp_path, capsys):
    path = tmp_path / "z.zarr"
    code, out, err = sim_demos(capsys, "--env", "multipath", "--episodes", "3", "--out", str(path),
                               "--env-arg", "variant=zpaths", "--env-arg", "noise=0.01")
    assert code == 0, err
    attrs = ZarrDataset.open(path).attrs
    # every constructor argument is recorded, defaults included: the whole scene travels with the data
    from vqbet_core.sim import scene_args

    assert attrs["variant"] == "zpaths" and attrs["env_args"] == scene_args("multipath", variant="zpaths", noise=0.01)
    assert attrs["env_args"]["noise"] == 0.01 and attrs["env_args"]["start_jitter"] == 0.1
    assert set(attrs["episode_modes"]) <= {"up-right-up", "right-up-right", "right-up-right-up"}


@pytest.mark.parametrize("argv, needle", [
    (["--env", "nope"], "unknown env 'nope'"),
    (["--env", "multipath", "--env-arg", "variant"], "KEY=VALUE"),
    (["--env", "multipath", "--env-arg", "bogus=1"], "bogus"),
    (["--env", "multipath", "--env-arg", "variant=maze"], "maze"),
    (["--env", "multipath", "--episodes", "0"], "--episodes"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    out_path = tmp_path / "bad.zarr"
    if "--episodes" not in argv:
        argv = argv + ["--episodes", "2"]
    code, out, err = sim_demos(capsys, *argv, "--out", str(out_path))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert not out_path.exists()


def test_hopeless_expert_gives_up_and_leaves_no_empty_store(tmp_path, capsys):
    out_path = tmp_path / "never.zarr"
    # 5 steps are far too few to reach the goal: every attempt fails
    code, out, err = sim_demos(capsys, "--env", "multipath", "--episodes", "2", "--out", str(out_path),
                               "--env-arg", "max_steps=5")
    assert code == 2 and out == ""
    assert "0 of 40 attempts" in err and err.count("\n") == 1
    assert not out_path.exists()


def test_action_noise_executes_perturbed_actions_and_records_clean_ones(tmp_path, capsys, fork_store):
    """DART: with --action-noise the next state is off the recorded action by the noise, and the recorded
    action is the expert's answer to the perturbed state (clean runs: next state = state + action)."""
    clean_path, _ = fork_store
    noisy_path = tmp_path / "noisy.zarr"
    rc = sim_demos(capsys, "--env", "multipath", "--episodes", "6", "--out", str(noisy_path), "--seed", "3",
                   "--action-noise", "0.05")[0]
    assert rc == 0

    def residuals(path):
        ds = ZarrDataset.open(path)
        out = []
        for e in range(ds.n_episodes):
            ep = ds.episode(e, ["state", "action"])
            out.append(ep["state"][1:] - ep["state"][:-1] - ep["action"][:-1])
        return ds, np.concatenate(out)

    clean, r_clean = residuals(clean_path)
    noisy, r_noisy = residuals(noisy_path)
    assert np.abs(r_clean).max() < 1e-5
    assert 0.03 < float(r_noisy.std()) < 0.07 and noisy.attrs["sim_demos_action_noise"] == 0.05
    assert "sim_demos_action_noise" not in clean.attrs
    assert sim_demos(capsys, "--env", "multipath", "--episodes", "1", "--out", str(tmp_path / "x.zarr"),
                     "--action-noise", "-1")[0] == 2
