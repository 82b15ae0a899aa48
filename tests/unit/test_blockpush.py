"""Two-block push (pybullet): determinism, image obs, the expert's four modes, labels from what happened, metrics."""

import numpy as np
import pytest

pytest.importorskip("pybullet")

from vqbet_core.errors import VqbetError  # noqa: E402
from vqbet_core.sim import make_env  # noqa: E402
from vqbet_core.sim.base import EpisodeResult  # noqa: E402
from vqbet_core.sim.blockpush import MAX_STEP, MODES, RELATIVE_LAYOUT, STATE_LAYOUT, BlockPushEnv  # noqa: E402


@pytest.fixture(scope="module")
def env():
    e = BlockPushEnv()
    yield e
    e.close()


def run_expert(env, seed, max_steps=None):
    obs = env.reset(seed=seed)
    expert = env.make_expert()
    expert.reset(env, np.random.default_rng([seed, 1]))
    states, actions = [obs["state"]], []
    for _ in range(max_steps or env.max_steps):
        a = expert.act(obs)
        obs, done = env.step(a)
        states.append(obs["state"])
        actions.append(a)
        if done:
            break
    return env.result(), expert, np.stack(states), np.stack(actions)


def test_make_env_and_interface(env):
    e = make_env("blockpush")
    assert isinstance(e, BlockPushEnv)
    e.close()
    assert env.obs_keys == ["state"] and env.image_keys == [] and env.action_dim == 2
    obs = env.reset(seed=0)
    assert set(obs) == {"state"}
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (sum(n for _, n in STATE_LAYOUT),) == (16,)
    np.testing.assert_allclose(obs["state"][6:8], [0.3, -0.4], atol=2e-3)  # effector starts where IBC's does
    attrs = env.dataset_attrs()
    assert attrs["source"] == "sim:blockpush" and attrs["control_hz"] == 10.0 and attrs["obs_keys"] == ["state"]


def test_reset_and_step_are_deterministic(env):
    other = BlockPushEnv()
    try:
        _, _, s1, a1 = run_expert(env, 7, max_steps=40)
        _, _, s2, a2 = run_expert(other, 7, max_steps=40)
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(a1, a2)
        assert not np.array_equal(env.reset(seed=8)["state"], other.reset(seed=7)["state"])
    finally:
        other.close()


def test_layout_follows_the_papers_and_ibc_ranges(env):
    """Blocks as in IBC; targets in the papers' two slots by default, anywhere in IBC's ranges with ``random``."""
    wide = BlockPushEnv(target_layout="random")
    try:
        slots, spread = set(), []
        for seed in range(20):
            for e in (env, wide):
                s = e.reset(seed=seed)["state"]
                blocks, targets = s[[0, 1, 3, 4]].reshape(2, 2), s[[10, 11, 13, 14]].reshape(2, 2)
                assert np.all(np.abs(blocks[:, 0] - 0.4) <= 0.1 + 1e-3)
                assert np.all(np.abs(blocks[:, 1] + 0.2) <= 0.15 + 1e-3)
                assert abs(blocks[0, 0] - blocks[1, 0]) > 0.1 - 1e-3 and abs(targets[0, 0] - targets[1, 0]) > 0.12 - 1e-3
                if e is env:
                    assert np.all(np.abs(np.abs(targets[:, 0] - 0.4) - 0.12) <= 0.005 + 1e-4)
                    assert np.all(np.abs(targets[:, 1] - 0.2) <= 0.0075 + 1e-4)
                    assert np.all(np.abs(s[[12, 15]]) <= np.pi / 30 + 1e-4)  # yaw pi +- pi/30 (reported modulo a quarter turn)
                    slots.add(bool(targets[0, 0] > 0.4))
                else:
                    assert np.all(np.abs(targets[:, 1] - 0.2) <= 0.15 + 1e-3)
                    spread.append(targets[:, 1])
        assert slots == {True, False}  # target 0 takes either slot
        assert np.ptp(np.concatenate(spread)) > 0.1
        assert env.dataset_attrs()["target_layout"] == "paper" and wide.dataset_attrs()["target_layout"] == "random"
        with pytest.raises(VqbetError, match="target_layout"):
            BlockPushEnv(target_layout="fixed")
    finally:
        wide.close()


def test_env_args_for_old_and_new_demos():
    """Demos whose attrs lack ``target_layout`` predate it (random layout); newer ones rebuild from their own args."""
    assert BlockPushEnv.env_args_for({"source": "sim:blockpush", "env_args": {}}) == {"target_layout": "random"}
    # recorded as a top-level attribute by an older sim-demos: that is the scene, not the pre-option default
    assert BlockPushEnv.env_args_for({"source": "sim:blockpush", "target_layout": "paper",
                                      "env_args": {"max_steps": 50}}) == {"max_steps": 50, "target_layout": "paper"}
    assert BlockPushEnv.env_args_for({"source": "sim:blockpush", "env_args": {"target_layout": "paper"}}) == {
        "target_layout": "paper"}
    assert BlockPushEnv.env_args_for({"source": "ros:recorder"}) == {}  # not this simulator's demos: nothing added


def test_image_obs_at_configured_size():
    e = BlockPushEnv(image_size=48, render_size=80)
    try:
        obs = e.reset(seed=1)
        assert e.image_keys == ["camera_front"]
        img = obs["camera_front"]
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 5  # table, blocks, targets, pusher
        frame = e.render()
        assert frame.shape == (80, 80, 3) and frame.dtype == np.uint8
        assert e.dataset_attrs()["cameras"] == {"front": {"height": 48, "width": 48}}
        obs2, _ = e.step(np.array([0.03, 0.0]))  # the pusher moves: the picture changes
        assert obs2["camera_front"].shape == (48, 48, 3) and not np.array_equal(obs2["camera_front"], img)
    finally:
        e.close()


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_expert_succeeds_and_label_matches_its_mode(env, seed):
    result, expert, _, actions = run_expert(env, seed)
    assert result.success, (seed, result)
    assert result.mode == expert.mode
    assert result.info["reached"] == 2 and result.info["in_target"] == 2
    assert result.length == len(actions) < env.max_steps
    assert np.all(np.linalg.norm(actions, axis=1) <= 0.03 + 1e-6)
    first_block = int(expert.mode[1])
    assert result.info["first_touched"] == first_block


def test_expert_picks_all_four_modes_evenly(env):
    env.reset(seed=0)
    expert = env.make_expert()
    modes = []
    for i in range(400):
        expert.reset(env, np.random.default_rng(i))
        modes.append(expert.mode)
    counts = {m: modes.count(m) for m in MODES}
    assert set(modes) == set(MODES)
    assert all(60 <= c <= 140 for c in counts.values()), counts


def test_idle_policy_reaches_nothing(env):
    env.reset(seed=2)
    for _ in range(5):
        env.step(np.zeros(2))
    r = env.result()
    assert not r.success and r.mode is None and r.info["reached"] == 0 and r.info["in_target"] == 0


def test_actions_are_clipped_and_checked(env):
    env.reset(seed=0)
    obs, _ = env.step(np.array([1.0, 0.0]))  # asks for 1 m, gets MAX_STEP
    np.testing.assert_allclose(obs["state"][8:10], [0.33, -0.4], atol=1e-6)
    with pytest.raises(VqbetError, match="expected 2 finite"):
        env.step(np.array([np.nan, 0.0]))
    with pytest.raises(VqbetError, match="expected 2 finite"):
        env.step(np.zeros(3))


def test_bad_constructor_arguments():
    with pytest.raises(VqbetError, match="image_size"):
        BlockPushEnv(image_size=4)
    with pytest.raises(VqbetError, match="control_hz"):
        BlockPushEnv(control_hz=7)
    with pytest.raises(VqbetError, match="relative_features"):
        BlockPushEnv(relative_features="yes")
    with pytest.raises(VqbetError, match="effector_target_in_state"):
        BlockPushEnv(effector_target_in_state="no")


def test_relative_features_append_differences_and_the_expert_still_succeeds(env):
    rel = BlockPushEnv(relative_features=True)
    try:
        result, _, states, _ = run_expert(rel, 3)
        _, _, plain, _ = run_expert(env, 3)
        assert result.success
        n = sum(k for _, k in STATE_LAYOUT)
        assert states.shape[1] == n + sum(k for _, k in RELATIVE_LAYOUT) == 28
        np.testing.assert_array_equal(states[:, :n], plain)  # the same world; the extra features only observe it
        b0, b1, eff, t0, t1 = plain[:, 0:2], plain[:, 3:5], plain[:, 6:8], plain[:, 10:12], plain[:, 13:15]
        np.testing.assert_allclose(states[:, n:], np.concatenate(
            [b0 - t0, b0 - t1, b1 - t0, b1 - t1, eff - b0, eff - b1], axis=1), atol=1e-6)
        names = [name for name, _ in rel.dataset_attrs()["state_layout"]]
        assert names[-1] == "effector_minus_block1_xy" and len(names) == len(STATE_LAYOUT) + 6
    finally:
        rel.close()


@pytest.mark.parametrize("action_mode", ["delta", "target"])
def test_state_without_the_effector_target_same_world_and_the_expert_still_succeeds(action_mode):
    """The commanded target is (nearly) the last action: without it a policy cannot copy its previous step."""
    lean, full = (BlockPushEnv(effector_target_in_state=False, action_mode=action_mode),
                  BlockPushEnv(action_mode=action_mode))
    try:
        result, _, states, actions = run_expert(lean, 3)
        full_result, _, plain, plain_actions = run_expert(full, 3)
        assert result.success and full_result.success
        assert states.shape[1] == 14 and "effector_target_xy" not in [n for n, _ in lean.dataset_attrs()["state_layout"]]
        if action_mode == "delta":  # the same episode, two dims fewer
            np.testing.assert_array_equal(states, np.delete(plain, [8, 9], axis=1))
            np.testing.assert_array_equal(actions, plain_actions)
        else:  # the expert tracks its own commanded target: a target within one step of the pusher, every step
            assert np.all(np.linalg.norm(actions - states[1:, 6:8], axis=1) < 2 * MAX_STEP)
    finally:
        lean.close()
        full.close()


def test_summarize_on_hand_made_results():
    def res(reached, placed, mode, first=0):
        return EpisodeResult(success=placed == 2, mode=mode, length=10,
                             info={"reached": reached, "in_target": placed, "first_touched": first})

    results = [res(2, 2, "b0->t1,b1->t0"), res(2, 1, "b1->t0", first=1), res(1, 0, None), res(0, 0, None, first=None)]
    m = BlockPushEnv.summarize(results, demo_modes=["b0->t1,b1->t0", "b1->t1,b0->t0"])
    assert (m["R1"], m["R2"], m["P1"], m["P2"], m["success"]) == (0.75, 0.5, 0.5, 0.25, 0.25)
    assert m["episodes"] == 4
    assert m["mode_freq"]["b0->t1,b1->t0"] == 0.25 and m["mode_freq"]["none"] == 0.5 and m["mode_freq"]["b1->t0"] == 0.25
    assert m["mode_freq"]["b0->t0,b1->t1"] == 0.0  # every expert mode is listed, seen or not
    assert m["demo_mode_freq"]["b0->t1,b1->t0"] == 0.5 and m["demo_mode_freq"]["b1->t1,b0->t0"] == 0.5
    assert m["first_reached_freq"] == {"b0": 0.5, "b1": 0.25, "none": 0.25}
    with pytest.raises(VqbetError, match="no episode results"):
        BlockPushEnv.summarize([])


@pytest.mark.slow
def test_expert_success_rate_and_mode_balance(env):
    results, modes = [], []
    for seed in range(1000, 1200):
        r, expert, _, _ = run_expert(env, seed)
        results.append(r)
        modes.append(expert.mode)
    m = BlockPushEnv.summarize(results, demo_modes=modes)
    print("blockpush expert:", m)
    assert m["P2"] >= 0.9
    assert all(0.15 <= m["mode_freq"][k] <= 0.35 for k in MODES)


def test_connecting_keeps_stdout_clean(capfd):
    """``vqbet eval`` / ``sim-demos`` print one JSON line on stdout: pybullet's C-level chatter goes to stderr."""
    capfd.readouterr()
    BlockPushEnv().close()
    out, err = capfd.readouterr()
    assert out == "" and "argv[0]" in err
