"""The scene a dataset was recorded on is the scene it is evaluated on, for every option of every sim env.

Why: a checkpoint once kept a whitelist of dataset attributes; blockpush's ``target_layout`` fell out of it
and ``vqbet eval`` ran the README's commands on the other layout (P2 0.08 instead of 0.9) without a word.
"""

import inspect

import pytest

from vqbet_core.evaluate import evaluation_scene
from vqbet_core.sim import ENVS, env_class, scene_args


@pytest.mark.parametrize("env", sorted(ENVS))
def test_every_option_is_recorded_and_rebuilt(env):
    params = [p for p in inspect.signature(env_class(env).__init__).parameters if p != "self"]
    recorded = scene_args(env)
    assert sorted(recorded) == sorted(params), f"{env}: sim-demos would not record {set(params) - set(recorded)}"
    attrs = {"source": f"sim:{env}", "env": env, "env_args": recorded}  # what sim-demos writes, train keeps
    scene, notices = evaluation_scene(env, attrs, {})
    assert scene == recorded and notices == []


@pytest.mark.parametrize("env", sorted(ENVS))
def test_each_override_is_named_with_both_values(env):
    recorded = scene_args(env)
    key = next(k for k, v in recorded.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    changed = recorded[key] * 2 + 1
    scene, notices = evaluation_scene(env, {"source": f"sim:{env}", "env_args": recorded}, {key: changed})
    assert scene == {**recorded, key: changed}
    assert notices == [f"evaluating on a scene that differs from the training demos': {key}={changed!r} "
                       f"(demos: {recorded[key]!r})"]


def test_demos_without_a_full_record_are_told_so():
    """An older dataset recorded only the options given on its command line: the rest is said, not hidden."""
    scene, notices = evaluation_scene("multipath", {"source": "sim:multipath", "env_args": {"variant": "zpaths"}}, {})
    assert scene["variant"] == "zpaths"
    assert len(notices) == 1 and notices[0].startswith("the training demos record no value for ")
    assert "noise=0.03" in notices[0]


def test_an_unknown_recorded_option_is_one_clear_error():
    from vqbet_core.errors import VqbetError

    with pytest.raises(VqbetError, match="env 'multipath'.*bogus.*its options: variant"):
        evaluation_scene("multipath", {"source": "sim:multipath", "env_args": {"bogus": 1}}, {})
