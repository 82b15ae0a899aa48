"""VQ-BeT learns the multimodal multipath demonstrations: reaches the goal and keeps both routes.

Small config so it runs in a couple of minutes on 2 CPU cores; the full figures (and the MSE policy's
collapse onto one route) are in the README, from `make demo`.
"""

import numpy as np
import pytest

from vqbet_core.agent import TorchAgent
from vqbet_core.cli.main import main as vqbet
from vqbet_core.config import load_config
from vqbet_core.evaluate import rollout
from vqbet_core.sim.multipath import MultipathEnv
from vqbet_core.train.trainer import Trainer


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "mp.zarr"
    assert vqbet(["sim-demos", "--env", "multipath", "--episodes", "60", "--out", str(out), "--seed", "0", "--no-progress"]) == 0
    return out


def test_vqbet_reaches_goal_and_keeps_both_routes(tmp_path, demos):
    cfg = load_config("multipath", {"gpt": {"n_layer": 2, "n_head": 2, "n_embd": 32},
                                    "heads": {"hidden": 64}, "vq": {"code_dim": 32, "hidden": 64},
                                    "train": {"phase1_steps": 250, "phase2_steps": 400, "batch_size": 64,
                                              "device": "cpu", "log_every": 100, "val_every": 400, "ckpt_every": 1000}})
    meta = Trainer(cfg, demos, tmp_path / "run", progress=False).run()
    demo_modes = meta["dataset_attrs"]["episode_modes"]
    agent = TorchAgent(tmp_path / "run", seed=0)
    env = MultipathEnv()
    results, _, _ = rollout(env, agent, episodes=40, seed=1000)
    m = env.summarize(results, demo_modes)
    assert m["success"] >= 0.9, m
    assert set(m["route_freq"]) >= {"up", "down"} and min(m["route_freq"]["up"], m["route_freq"]["down"]) >= 0.15, m
    for route, demo_freq in m["demo_route_freq"].items():
        assert abs(m["route_freq"].get(route, 0.0) - demo_freq) <= 0.25, m
    assert np.isfinite(m["mean_length"])
