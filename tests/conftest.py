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
