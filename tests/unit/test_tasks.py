"""Subtask labels, completion targets and the goal sequencer (DESIGN.md section 9), on hand-made sequences."""

import numpy as np
import pytest
import torch

from vqbet_core.data.tasks import (completion_targets, finished_subtask, marks_from_task_index, named_goal_vectors,
                                   near_subtask_end, one_hot_goals, task_index_from_marks)
from vqbet_core.errors import VqbetError
from vqbet_core.runtime.sequencer import TaskSequencer

NAMES = ["microwave", "kettle", "light switch"]


def test_marks_become_per_step_labels_and_back():
    ti = task_index_from_marks(10, [(6, "light switch"), (2, "kettle")], NAMES)  # order of marks does not matter
    assert ti.tolist() == [1, 1, 1, 2, 2, 2, 2, -1, -1, -1] and ti.dtype == np.int64
    assert marks_from_task_index(ti, NAMES) == [(2, "kettle"), (6, "light switch")]
    with pytest.raises(VqbetError, match="'oven'.*expected one of"):
        task_index_from_marks(5, [(1, "oven")], NAMES)
    with pytest.raises(VqbetError, match="step 9.*0..4"):
        task_index_from_marks(5, [(9, "kettle")], NAMES)


def test_completion_targets_mark_the_last_steps_of_each_subtask_per_episode():
    # episode 1: kettle for 4 steps then microwave for 3; episode 2: light switch for 5
    ti = np.array([1, 1, 1, 1, 0, 0, 0, 2, 2, 2, 2, 2])
    got = completion_targets(ti, np.array([7, 12]), horizon=2)
    assert got.tolist() == [0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1]
    # the same subtask in two episodes back to back is two runs (the episode boundary ends the first)
    got = completion_targets(np.array([0, 0, 0, 0]), np.array([2, 4]), horizon=1)
    assert got.tolist() == [0, 1, 0, 1]
    assert completion_targets(np.array([-1, -1]), np.array([2]), 3).tolist() == [0, 0]
    with pytest.raises(VqbetError, match="horizon"):
        completion_targets(ti, np.array([12]), 0)


def test_finished_subtask_points_the_first_steps_past_an_end_at_it():
    # episode 1: kettle 0..3, microwave 4..6 (ends with the episode); episode 2: light switch 7..9, kettle 10..11
    ti = np.array([1, 1, 1, 1, 0, 0, 0, 2, 2, 2, 1, 1])
    task, end = finished_subtask(ti, np.array([7, 12]), after=2)
    assert task.tolist() == [-1, -1, -1, -1, 1, 1, -1, -1, -1, -1, 2, 2]
    assert end.tolist() == [-1, -1, -1, -1, 3, 3, -1, -1, -1, -1, 9, 9]
    # a run shorter than `after`: the nearest end wins; nothing crosses into the next episode
    task, end = finished_subtask(np.array([0, 1, 2, 2, 2]), np.array([5]), after=3)
    assert task.tolist() == [-1, 0, 1, 1, 1] and end.tolist() == [-1, 0, 1, 1, 1]
    assert finished_subtask(ti, np.array([12]), after=0)[0].tolist() == [-1] * 12
    with pytest.raises(VqbetError, match="after"):
        finished_subtask(ti, np.array([12]), after=-1)


def test_near_subtask_end_covers_the_last_steps_and_the_first_steps_past_each_end():
    # episode 1: kettle 0..3, microwave 4..6 (ends with the episode); episode 2: light switch 7..9, kettle 10..11
    ti = np.array([1, 1, 1, 1, 0, 0, 0, 2, 2, 2, 1, 1])
    task, first = near_subtask_end(ti, np.array([7, 12]), span=2)
    # step 5 is past the kettle's end and in microwave's last two: its own run wins
    assert task.tolist() == [-1, -1, 1, 1, 1, 0, 0, -1, 2, 2, 1, 1]
    assert first.tolist() == [-1, -1, 0, 0, 0, 4, 4, -1, 7, 7, 10, 10]
    assert near_subtask_end(np.array([-1, -1]), np.array([2]), 3)[0].tolist() == [-1, -1]
    with pytest.raises(VqbetError, match="span"):
        near_subtask_end(ti, np.array([12]), span=0)


def test_one_hot_goals_and_named_vectors_agree():
    goals = one_hot_goals(np.array([2, 0, -1]), 3)
    assert goals.tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 0]]
    named = named_goal_vectors(NAMES)
    assert named["light switch"] == goals[0].tolist() and list(named) == NAMES
    with pytest.raises(VqbetError, match="task_index holds"):
        one_hot_goals(np.array([3]), 3)


def test_completion_loss_is_bce_on_the_scored_steps_only():
    from vqbet_core.config import DEFAULTS, deep_merge
    from vqbet_core.models import build_policy

    cfg = deep_merge(DEFAULTS, {"obs_window": 3, "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 16},
                                "vq": {"code_dim": 8, "hidden": 8}, "heads": {"hidden": 8},
                                "completion": {"horizon": 2, "weight": 2.0, "hidden": 8},
                                "data": {"goal_key": "task_index"}})
    torch.manual_seed(0)
    for kind in ("vqbet", "bet"):
        policy = build_policy({**cfg, "policy": kind}, obs_dim=4, action_dim=2, goal_dim=3)
        feats = torch.randn(2, 3, 16)
        done = torch.tensor([[float("nan"), 0.0, 1.0], [0.0, 0.0, 0.0]])
        loss, metrics = policy._completion_loss(feats, done)
        logits = policy.completion_head(feats).squeeze(-1)
        mask = ~torch.isnan(done)
        want = 2.0 * torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], done[mask])
        assert torch.allclose(loss, want) and "completion_recall" in metrics
        # windows past a subtask's end (completion.after) run through the GPT and are scored with the rest
        f_obs, f_goal, f_done = torch.randn(2, 3, 4), torch.eye(3)[:2], torch.tensor([[float("nan"), 1.0, 1.0]] * 2)
        policy.eval()
        loss, _ = policy._completion_loss(feats, done, (f_obs, f_goal, f_done))
        all_feats = torch.cat([feats, policy.gpt(f_obs, f_goal)])
        all_done = torch.cat([done, f_done])
        all_logits = policy.completion_head(all_feats).squeeze(-1)
        mask = ~torch.isnan(all_done)
        want = 2.0 * torch.nn.functional.binary_cross_entropy_with_logits(all_logits[mask], all_done[mask])
        assert torch.allclose(loss, want)
        heads = policy.heads(torch.randn(2, 3, 4), torch.eye(3)[:2])
        assert heads.completion.shape == (2,) and ((heads.completion >= 0) & (heads.completion <= 1)).all()


def test_an_obs_input_head_reads_feature_observation_and_goal():
    """completion.obs_input: the head's input is [GPT feature, the step's observation, the goal]."""
    from vqbet_core.config import DEFAULTS, deep_merge
    from vqbet_core.models import build_policy

    cfg = deep_merge(DEFAULTS, {"obs_window": 3, "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 16},
                                "vq": {"code_dim": 8, "hidden": 8}, "heads": {"hidden": 8},
                                "completion": {"horizon": 1, "hidden": 8, "obs_input": True},
                                "data": {"goal_key": "task_index"}})
    torch.manual_seed(0)
    for kind in ("vqbet", "bet"):
        policy = build_policy({**cfg, "policy": kind}, obs_dim=4, action_dim=2, goal_dim=3).eval()
        assert policy.completion_head[0].in_features == 16 + 4 + 3
        obs, goal = torch.randn(2, 3, 4), torch.eye(3)[:2]
        feats = policy.gpt(obs, goal)
        done = torch.tensor([[float("nan"), 0.0, 1.0], [0.0, 0.0, 1.0]])
        loss, _ = policy._completion_loss(feats, done, None, obs, goal)
        inputs = torch.cat([feats, obs, goal.unsqueeze(1).expand(2, 3, 3)], dim=-1)
        logits = policy.completion_head(inputs).squeeze(-1)
        mask = ~torch.isnan(done)
        assert torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], done[mask]))
        heads = policy.heads(obs, goal)
        assert torch.allclose(heads.completion, torch.sigmoid(logits[:, -1]))  # the last step's, as at run time
        moved = obs.clone()
        moved[:, -1, 0] += 5.0  # the observation alone changes the score (the GPT sees it too, but not only)
        assert not torch.allclose(policy.heads(moved, goal).completion, heads.completion)


def test_a_policy_without_the_head_has_no_completion():
    from vqbet_core.config import DEFAULTS, deep_merge
    from vqbet_core.models import build_policy

    cfg = deep_merge(DEFAULTS, {"obs_window": 2, "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 16}})
    policy = build_policy(cfg, obs_dim=4, action_dim=2)
    assert policy.completion_head is None and policy.heads(torch.randn(1, 2, 4), None).completion is None
    assert policy._completion_loss(torch.randn(1, 2, 16), torch.ones(1, 2))[0].item() == 0.0


def test_sequencer_threshold_debounce_and_operator():
    seq = TaskSequencer(["kettle", "microwave"], known=NAMES, threshold=0.6, debounce=0.2)
    assert seq.current == "kettle" and seq.progress == (0, 2)
    assert not seq.update(0.9, 0.0)  # above, but not yet for 0.2 s
    assert not seq.update(0.3, 0.1)  # dropped below: the debounce starts again
    assert not seq.update(0.7, 0.2) and not seq.update(0.7, 0.3)
    assert seq.update(0.7, 0.4) and seq.current == "microwave"
    assert not seq.update(1.0, 0.5, active=False) and not seq.update(1.0, 0.6, active=False)  # disabled: ignored
    assert seq.advance(0.7) and seq.finished and seq.current is None
    assert not seq.advance(0.8) and not seq.update(1.0, 0.9)  # finished: holds
    assert [(e[1], e[2]) for e in seq.events] == [("kettle", "model"), ("microwave", "operator")]
    with pytest.raises(VqbetError, match="unknown subtask.*'oven'"):
        TaskSequencer(["oven"], known=NAMES)
    with pytest.raises(VqbetError, match="threshold"):
        TaskSequencer(["kettle"], threshold=0.0)
    instant = TaskSequencer(["kettle"], threshold=0.5)
    assert instant.update(0.5, 3.0) and instant.finished


def test_sequencer_refractory_time_after_an_advance():
    """Right after the goal changes the scores do not count (a head that fires there cascaded through sequences)."""
    seq = TaskSequencer(["kettle", "microwave", "light switch"], threshold=0.5, refractory=1.0)
    assert seq.update(0.9, 0.0) and seq.current == "microwave"
    assert not seq.update(0.9, 0.5) and not seq.update(0.9, 0.99)  # within 1 s of the advance
    assert seq.update(0.9, 1.0) and seq.current == "light switch"
    seq.advance(1.2, "operator")  # an operator advance starts the refractory time too
    assert seq.finished
    with pytest.raises(VqbetError, match="refractory"):
        TaskSequencer(["kettle"], refractory=-1.0)


@pytest.mark.parametrize("completion, needle", [
    ({"unmoved": 1.5}, "completion.unmoved must be a number in \\[0, 1\\]"),
    ({"unmoved": True}, "completion.unmoved must be"),
    ({"horizon": 0, "after": 0, "unmoved": 0.25}, "unmoved > 0 needs the completion head"),
])
def test_bad_unmoved_settings_are_config_errors(completion, needle):
    from vqbet_core.config import load_config
    from vqbet_core.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_config("kitchen_goal", {"completion": completion})
