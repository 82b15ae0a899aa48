"""Fixtures of the launch tests: ROS 2 tooling (or a skip with the reason), one workspace built per session the
way docker/Dockerfile builds it, a tiny exported block-push model, and a folder to launch from that is not the
repository root."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import _launch_support as L  # noqa: E402


@pytest.fixture(scope="session")
def ros2_tools() -> dict:
    pytest.importorskip("rclpy")
    env, what = L.find_ros2()
    if env is None:
        pytest.skip(what)
    return env


@pytest.fixture(scope="session")
def workspace(ros2_tools, tmp_path_factory) -> dict:
    """A clean clone's workspace built with docker/Dockerfile's command; the environment after sourcing it."""
    clone = L.copy_clone(tmp_path_factory.mktemp("clone"))
    ws = clone / "ros2_ws"
    result = L.colcon_build(ws, ros2_tools, L.COLCON_BUILD[2:])
    assert result.returncode == 0, f"{' '.join(L.COLCON_BUILD)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return {"clone": clone, "ws": ws, "install": ws / "install",
            "env": L.sourced_env(ws / "install" / "setup.bash", ros2_tools)}


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """The folder ``ros2 launch`` runs in: neither the repository root nor the clone."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def blockpush_model(tmp_path_factory) -> Path:
    """A tiny VQ-BeT for the block-push gantry (calibration/blockpush_sim.yaml: 2 joints, one 96x96 camera),
    trained a few steps on synthetic episodes and exported: enough for policy_node to load it and command."""
    pytest.importorskip("torch")
    import torch

    from vqbet_core.calibration import load_calibration
    from vqbet_core.cli.main import main as vqbet
    from vqbet_core.data.store import ZarrDataset

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("blockpush_model")
    calib = load_calibration(L.REPO / "calibration" / "blockpush_sim.yaml")
    ds = ZarrDataset.create(tmp / "tiny.zarr", {**calib.to_attrs(), "source": "test"})
    rng = np.random.default_rng(0)
    mid = ((calib.lower + calib.upper) / 2).astype(np.float32)
    for e in range(4):
        step = np.float32(0.01 if e % 2 else -0.01)
        q = mid + rng.normal(0, 0.02, mid.size).astype(np.float32)
        qs = np.stack([q + step * t for t in range(12)]).astype(np.float32)
        ds.add_episode({"robot_joint": qs, "action": qs + step,
                        "camera_front": rng.integers(0, 255, (12, 96, 96, 3), dtype=np.uint8),
                        "timestamp": np.arange(12) / 10.0})
    cfg = {"name": "tiny_blockpush", "policy": "vqbet",
           "data": {"obs_keys": ["robot_joint"], "image_keys": ["camera_front"], "val_fraction": 0.0},
           "vision": {"weights": "none", "image_size": 96}, "obs_window": 2, "action_chunk": 3,
           "vq": {"n_codes": 4, "code_dim": 16, "hidden": 32}, "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 32},
           "heads": {"hidden": 32},
           "train": {"phase1_steps": 10, "phase2_steps": 4, "batch_size": 16, "phase1_batch_size": 32, "log_every": 5,
                     "val_every": 100, "ckpt_every": 100, "device": "cpu"}}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert vqbet(["train", "--config", str(tmp / "tiny.yaml"), "--data", str(tmp / "tiny.zarr"), "--out",
                  str(tmp / "run"), "--no-progress"]) == 0
    assert vqbet(["export", "--checkpoint", str(tmp / "run"), "--out", str(tmp / "model"), "--parity-steps", "2"]) == 0
    return tmp / "model"
