"""Shared test settings: few threads (CI has 2 cores), headless rendering, private ROS 2 domains."""

import atexit
import os
import random
import shutil
import tempfile

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# image-model trainings cache frozen-encoder features under $VQBET_CACHE: a private one per test session,
# so tests never fill (or read stale entries from) the user's ~/.cache/vqbet
_FEATURE_CACHE = tempfile.mkdtemp(prefix="vqbet-test-cache-")
os.environ["VQBET_CACHE"] = _FEATURE_CACHE
atexit.register(shutil.rmtree, _FEATURE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass


@pytest.fixture
def ros_env(monkeypatch):
    """A private ROS 2 domain on loopback for this test (and the processes it starts)."""
    domain = str(random.randint(101, 215))
    monkeypatch.setenv("ROS_DOMAIN_ID", domain)
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return dict(os.environ)


@pytest.fixture
def head_stage_kept_policy():
    """Check for a head-only stage (``--init-from RUN``): the completion head has a wider input than RUN's (it
    started anew) and every policy tensor (GPT, code and offset heads, tokenizer) is RUN's."""
    import numpy as np

    from vqbet_core.train.checkpoint import load_tensors

    def check(run, head):
        before = load_tensors(run / "checkpoint" / "model.safetensors", "cpu")
        after = load_tensors(head / "checkpoint" / "model.safetensors", "cpu")
        assert after["completion_head.0.weight"].shape[1] > before["completion_head.0.weight"].shape[1]
        for key in before:
            if key.startswith(("gpt.", "primary_head.", "secondary_head.", "tokenizer.", "offset_head.")):
                assert np.allclose(before[key].numpy(), after[key].numpy(), atol=1e-6), key

    return check
