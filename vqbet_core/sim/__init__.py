"""Simulated tasks with scripted multimodal experts (see ``vqbet_core.sim.base``)."""

from __future__ import annotations

import importlib

from vqbet_core.errors import VqbetError

# env name -> (module, class); modules are imported on demand (pybullet / mujoco are heavy)
ENVS = {
    "multipath": ("vqbet_core.sim.multipath", "MultipathEnv"),
    "blockpush": ("vqbet_core.sim.blockpush", "BlockPushEnv"),
    "pusht_image": ("vqbet_core.sim.pusht", "PushTImageEnv"),
    "kitchen": ("vqbet_core.sim.kitchen", "KitchenEnv"),
}


def env_class(name: str):
    """The env class ``name`` names, without building a simulator (its static ``summarize`` needs none)."""
    if name not in ENVS:
        raise VqbetError(f"unknown env '{name}' (expected one of: {', '.join(ENVS)})")
    module_name, cls_name = ENVS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise VqbetError(f"env '{name}' needs a package that is not installed: {exc.name} (pip install -e '.[sim]')") from None
    return getattr(module, cls_name)


def make_env(name: str, **kwargs):
    return env_class(name)(**kwargs)
