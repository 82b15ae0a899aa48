"""The simulated robot's ROS-free pieces, shared by ``sim_robot_node`` and ``scripted_teleop_node``.

Why apart from the nodes: the ``/sim/state`` layout, the ``env_args`` parameter and building the env are plain
Python, so unit tests (and the teleop's expert driver) use them without rclpy.
"""

from __future__ import annotations

import numpy as np

from vqbet_core.errors import VqbetError

# /sim/state layout: these header fields, then the env's low-dim observation (obs_keys order, flattened)
STATE_HEADER = ("episode", "seed", "step", "running", "stamp_sec", "stamp_nanosec")


def parse_env_args(text: str) -> dict:
    """The ``env_args`` parameter: a YAML mapping (``"{action_mode: target, image_size: 96}"``), empty = ``{}``."""
    import yaml

    if not text.strip():
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise VqbetError(f"parameter env_args is not valid YAML ({str(exc).splitlines()[0]}): {text!r}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise VqbetError(f"parameter env_args must be a YAML mapping like '{{image_size: 96}}', got {text!r}")
    return value


def make_sim_env(name: str, env_args: dict, control_hz: float = 0.0):
    """``make_env`` with the node's parameters; a wrong keyword becomes one VqbetError line."""
    from vqbet_core.sim import make_env

    kwargs = dict(env_args)
    if control_hz:
        kwargs.setdefault("control_hz", float(control_hz))
    try:
        env = make_env(name, **kwargs)
    except TypeError as exc:
        raise VqbetError(f"parameter env_args {env_args} (control_hz {control_hz or 'default'}) not accepted by env "
                         f"'{name}': {exc}") from None
    if not getattr(env, "joint_names", None):
        env.close()
        raise VqbetError(f"parameter env: env '{name}' has no joint_names, so it cannot be driven as a robot")
    return env


def lowdim_vector(obs: dict, keys: list[str]) -> np.ndarray:
    """The env's low-dim observation keys, flattened and concatenated (the body of ``/sim/state``)."""
    return np.concatenate([np.asarray(obs[k], np.float64).reshape(-1) for k in keys]) if keys else np.zeros(0)
