"""The long-horizon metrics of ``vqbet eval --task-sequence`` on hand-made episodes (no simulator)."""

import pytest

from vqbet_core.evaluate import summarize_sequences
from vqbet_core.sim.base import EpisodeResult


def episode(requested, in_order, done_at, advances, as_goal, last_step, advance="model"):
    return EpisodeResult(success=in_order == len(requested), info=dict(
        requested=requested, in_order=in_order, advance=advance, done_at=done_at, advances=advances,
        completed_as_goal=as_goal, last_step=last_step))


def test_the_completion_that_ends_the_episode_is_not_counted_as_missed():
    # the env ended the episode on the step "b" completed: no score was read after it
    finished = episode(["a", "b"], 2, {"a": 5, "b": 20}, [("a", 7)], ["a", "b"], last_step=20)
    out = summarize_sequences([finished])
    assert out["completion_recall"] == 1.0
    assert out["completions_at_episode_end"] == 1
    assert out["completion_precision"] == 1.0 and out["completion_delay_mean_steps"] == 2.0


def test_a_completion_the_episode_went_on_past_without_an_advance_is_a_miss():
    stuck = episode(["a", "b"], 1, {"a": 5}, [], ["a"], last_step=80)
    caught = episode(["a", "b"], 2, {"a": 5, "b": 30}, [("a", 7), ("b", 32)], ["a", "b"], last_step=32)
    out = summarize_sequences([stuck, caught])
    assert out["completion_recall"] == pytest.approx(2 / 3)
    assert out["completions_at_episode_end"] == 0
    assert out["in_order_mean"] == 1.5


def test_an_advance_before_the_completion_is_not_precise():
    early = episode(["a", "b"], 0, {"a": 12}, [("a", 9)], [], last_step=80)
    out = summarize_sequences([early])
    assert out["completion_precision"] == 0.0 and out["completion_delay_mean_steps"] == -3.0
    assert out["completion_recall"] is None  # "a" completed after the goal had moved on


def test_seen_and_unseen_orders_are_split_by_the_demo_modes():
    seen = episode(["a", "b"], 2, {}, [], [], 10, advance="oracle")
    unseen = episode(["b", "a"], 1, {}, [], [], 10, advance="oracle")
    out = summarize_sequences([seen, unseen], demo_modes=["a>b"])
    assert (out["in_order_mean_seen"], out["in_order_mean_unseen"]) == (2.0, 1.0)
    assert "completion_recall" not in out  # no model-advanced episodes
