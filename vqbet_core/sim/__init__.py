"""Simulated tasks with scripted multimodal experts (see ``vqbet_core.sim.base``)."""

from __future__ import annotations

import importlib
import inspect

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


def _plain(value):
    """JSON / YAML friendly copy (tuples become lists) so a recorded scene compares equal after a round trip."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def scene_args(name: str, **kwargs) -> dict:
    """Every constructor argument of env ``name``, defaults included, as it would be built with ``kwargs``.

    Why: a dataset must record the whole scene it was made on, not only the options someone typed; a default
    that changes later (blockpush's ``target_layout``) would otherwise silently change the evaluation scene.
    """
    cls = env_class(name)
    try:
        bound = inspect.signature(cls.__init__).bind(None, **kwargs)
    except TypeError as exc:
        options = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise VqbetError(f"env '{name}': {exc} (its options: {', '.join(options)})") from None
    bound.apply_defaults()
    return {k: _plain(v) for k, v in bound.arguments.items() if k != "self"}
