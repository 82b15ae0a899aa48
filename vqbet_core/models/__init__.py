"""Policy models: VQ-BeT and the BeT baseline behind one interface (``base.Policy``)."""

from __future__ import annotations

import numbers

from vqbet_core.errors import ConfigError
from vqbet_core.models.base import Heads, Policy


def build_policy(cfg: dict, obs_dim: int, action_dim: int, goal_dim: int = 0) -> Policy:
    """A fresh policy of kind ``cfg["policy"]`` (``"vqbet"`` or ``"bet"``) for the given dimensions."""
    dims = {}
    for name, value, low in (("obs_dim", obs_dim, 1), ("action_dim", action_dim, 1), ("goal_dim", goal_dim, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        dims[name] = int(value)
    obs_dim, action_dim, goal_dim = dims["obs_dim"], dims["action_dim"], dims["goal_dim"]
    kind = cfg.get("policy")
    if kind == "vqbet":
        from vqbet_core.models.vqbet import VQBeTPolicy

        return VQBeTPolicy(cfg, obs_dim, action_dim, goal_dim)
    if kind == "bet":
        from vqbet_core.models.bet import BeTPolicy

        return BeTPolicy(cfg, obs_dim, action_dim, goal_dim)
    raise ConfigError(f"policy must be 'vqbet' or 'bet', got {kind!r}")


__all__ = ["Heads", "Policy", "build_policy"]
