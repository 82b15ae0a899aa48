"""Multipath point mass: determinism, blocking obstacles, the expert's routes, labels from trajectories, metrics."""

import numpy as np
import pytest

from vqbet_core.errors import VqbetError
from vqbet_core.sim import make_env
from vqbet_core.sim.base import EpisodeResult
from vqbet_core.sim.multipath import MultipathEnv, label_trajectory, plot_trajectories

VARIANT_ROUTES = {"fork": {"up", "down"}, "zpaths": {"up-right-up", "right-up-right", "right-up-right-up"}}


def run_expert(env, seed):
    obs = env.reset(seed=seed)
    expert = env.make_expert()
    expert.reset(env, np.random.default_rng(seed))
    done, steps = False, 0
    while not done:
        obs, done = env.step(expert.act(obs))
        steps += 1
    return env.result(), expert.route, env.trajectory


def rollout(env, seed, policy, steps=None):
    obs = env.reset(seed=seed)
    for _ in range(steps or env.max_steps):
        obs, done = env.step(policy(obs))
        if done:
            break
    return env.result()


def toward_goal(env):
    return lambda obs: env.goal_pos - obs["state"]


def test_make_env_and_interface():
    env = make_env("multipath", variant="zpaths")
    assert isinstance(env, MultipathEnv)
    obs = env.reset(seed=0)
    assert set(obs) == {"state"} and obs["state"].dtype == np.float32 and obs["state"].shape == (2,)
    assert env.obs_keys == ["state"] and env.image_keys == [] and env.action_dim == 2
    assert env.dataset_attrs() == {"source": "sim:multipath", "variant": "zpaths", "control_hz": 10,
                                   "obs_keys": ["state"], "routes": sorted(VARIANT_ROUTES["zpaths"])}


@pytest.mark.parametrize("kwargs", [{"variant": "maze"}, {"noise": -1}, {"max_steps": 0}, {"max_step": 0.0}])
def test_bad_constructor_args_are_one_line_errors(kwargs):
    with pytest.raises(VqbetError) as info:
        MultipathEnv(**kwargs)
    assert "\n" not in str(info.value) and next(iter(kwargs)) in str(info.value)


@pytest.mark.parametrize("variant", ["fork", "zpaths"])
def test_reset_and_step_deterministic_under_seed(variant):
    def trace(seed):
        env = MultipathEnv(variant)
        obs = env.reset(seed=seed)
        rng = np.random.default_rng(123)
        states = [obs["state"]]
        for _ in range(30):
            obs, _ = env.step(rng.uniform(-0.3, 0.3, 2))
            states.append(obs["state"])
        return np.stack(states)

    a, b, c = trace(5), trace(5), trace(6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], c[0])  # the start is jittered per seed
    r1, _, t1 = run_expert(MultipathEnv(variant), 11)
    r2, _, t2 = run_expert(MultipathEnv(variant), 11)
    np.testing.assert_array_equal(t1, t2)
    assert r1 == r2


def test_actions_are_clipped_to_max_step():
    env = MultipathEnv("zpaths", max_step=0.25)
    start = env.reset(seed=0)["state"]
    obs, _ = env.step(np.array([0.0, 5.0]))  # straight up along x ~ 0: free space
    assert np.linalg.norm(obs["state"] - start) == pytest.approx(0.25, abs=1e-5)


@pytest.mark.parametrize("variant", ["fork", "zpaths"])
def test_straight_line_to_goal_is_blocked(variant):
    env = MultipathEnv(variant)
    result = rollout(env, 3, toward_goal(env))
    assert not result.success
    assert result.length == env.max_steps
    assert result.info["blocked_steps"] > env.max_steps // 2
    assert result.mode is None  # it never got past the obstacle
    pos = env.trajectory[-1]
    # stuck right at the obstacle face, never inside
    for x0, y0, x1, y1 in env.obstacles:
        for p in env.trajectory:
            assert not (x0 < p[0] < x1 and y0 < p[1] < y1)
    assert min(min(abs(pos[0] - b[0]), abs(pos[1] - b[1])) for b in env.obstacles) < 1e-3


def test_a_move_through_a_thin_obstacle_is_stopped():
    env = MultipathEnv("fork", max_step=10.0)  # one huge step would jump over the block
    env.reset(seed=0)
    obs, _ = env.step(np.array([4.0, 0.0]))
    assert obs["state"][0] < env.obstacles[0][0]


@pytest.mark.parametrize("variant", ["fork", "zpaths"])
def test_expert_succeeds_and_takes_every_route(variant):
    env = MultipathEnv(variant)
    routes = []
    for seed in range(12):
        result, route, traj = run_expert(env, seed)
        assert result.success, (variant, seed)
        assert result.mode == route  # the label read off the trajectory is the route the expert chose
        assert result.info["blocked_steps"] == 0
        assert np.linalg.norm(traj[-1] - env.goal_pos) <= env.success_radius
        routes.append(route)
    assert set(routes) == VARIANT_ROUTES[variant]


def test_labels_from_hand_made_trajectories():
    fork_up = np.array([[1, 2], [2, 2], [2, 4], [4, 4], [4, 2], [5, 2]], float)
    fork_down = fork_up * [1, -1] + [0, 4]
    dense = lambda pts: np.concatenate([np.linspace(a, b, 20) for a, b in zip(pts[:-1], pts[1:])])
    assert label_trajectory(dense(fork_up), "fork") == "up"
    assert label_trajectory(dense(fork_down), "fork") == "down"
    assert label_trajectory(dense(fork_up[:3]), "fork") is None  # never past the block
    z = {"up-right-up": [(0, 0), (0, 4), (8, 4), (8, 8)],
         "right-up-right": [(0, 0), (4, 0), (4, 8), (8, 8)],
         "right-up-right-up": [(0, 0), (4, 0), (4, 4), (8, 4), (8, 8)],
         "up-right-up-right": [(0, 0), (0, 4), (4, 4), (4, 8), (8, 8)]}
    for name, pts in z.items():
        assert label_trajectory(dense(np.array(pts, float)), "zpaths") == name


def test_policy_that_mixes_routes_at_the_crossing_gets_the_undemonstrated_label():
    """zpaths: up first, then up again at (4, 4) - a route no demonstration takes."""
    env = MultipathEnv("zpaths", start_jitter=0.0)
    waypoints = iter([(0, 4), (4, 4), (4, 8), (8, 8)])
    target = [np.array(next(waypoints), float)]

    def policy(obs):
        if np.linalg.norm(target[0] - obs["state"]) < 0.05:
            target[0] = np.array(next(waypoints, (8, 8)), float)
        return target[0] - obs["state"]

    result = rollout(env, 0, policy)
    assert result.success and result.mode == "up-right-up-right"


def test_summarize_keys_and_values():
    results = [EpisodeResult(True, "up", 40), EpisodeResult(True, "up", 42), EpisodeResult(False, None, 100),
               EpisodeResult(True, "down", 38)]
    m = MultipathEnv.summarize(results, ["up", "down", "down", "down"])
    assert m["success"] == 0.75 and m["episodes"] == 4 and m["mean_length"] == 55.0
    assert m["route_freq"] == {"down": 0.25, "none": 0.25, "up": 0.5}
    assert m["demo_route_freq"] == {"down": 0.75, "none": 0.0, "up": 0.25}
    assert set(m["route_freq"]) == set(m["demo_route_freq"])
    assert m["route_tv"] == pytest.approx(0.5)
    no_demo = MultipathEnv.summarize(results)
    assert no_demo["demo_route_freq"] is None and "route_tv" not in no_demo


def test_render_and_plot(tmp_path):
    env = MultipathEnv("fork", render_size=64)
    result, _, traj = run_expert(env, 0)
    img = env.render()
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert (img == 150).all(-1).any()  # obstacle drawn
    r, g, b = (img[..., i].astype(int) for i in range(3))
    assert ((b > 150) & (r < 120)).any()  # the path (blue)
    assert ((r > 200) & (g < 100)).any()  # the goal zone (red)
    env.reset(seed=0)
    fresh = env.render()
    assert not ((fresh[..., 2].astype(int) > 150) & (fresh[..., 0] < 120)).any()  # no path yet
    out = plot_trajectories([traj, traj[:5]], [result.mode, None], tmp_path / "p.png", env)
    assert out.exists() and out.stat().st_size > 1000
