"""Training configs: YAML files, named ones shipped in ``vqbet_core/configs/``, merged over defaults."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from vqbet_core.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"

DEFAULTS: dict = {
    "name": "custom",
    "policy": "vqbet",  # vqbet | bet
    "data": {
        "obs_keys": ["robot_joint"],  # low-dim keys, normalized and concatenated per step
        "image_keys": [],  # camera_<name> keys, encoded by the vision encoder
        "action_key": "action",
        "goal_key": None,  # per-step goal vector key for goal-conditioned training
        "val_fraction": 0.1,
    },
    "vision": {"weights": "none", "image_size": 96, "feature_dim": 512, "finetune": False},
    "obs_window": 5,
    "action_chunk": 1,
    "vq": {"n_codes": 16, "n_layers": 2, "code_dim": 512, "hidden": 128, "ema_decay": 0.8,
           "commitment_weight": 5.0, "dead_code_threshold": 1.0},
    "gpt": {"n_layer": 6, "n_head": 6, "n_embd": 120, "dropout": 0.1},
    "heads": {"hidden": 512},
    "loss": {"primary": 5.0, "secondary": 0.5, "offset": 100.0, "focal_gamma": 2.0, "offset_codes": "sampled"},
    "bet": {"n_bins": 24, "offset_weight": 100.0},
    "sampling": {"temperature": 1.0, "sequential": True, "blend": "average"},  # blend: average | none
    # subtask completion head (DESIGN.md section 9): horizon > 0 trains "the current subtask ends within
    # `horizon` steps" from data/task_index (needs data.goal_key: task_index); after > 0 also shows the head
    # the first `after` steps past each subtask's end with that subtask as the goal, labelled done
    # (vqbet_core.data.tasks.finished_subtask); `after_fraction` of a batch's size is added as such windows.
    # unmoved > 0: that fraction of a batch's size is added as windows around a subtask's end with its own
    # object dims (.zattrs task_state_dims) put back where the subtask started, labelled not done
    # (TrainingData.unmoved_batch; camera configs: those steps re-rendered, vqbet_core.vision.unmoved_frames)
    # obs_input: the head also reads the step's observation and goal (not only the GPT feature)
    "completion": {"horizon": 0, "weight": 1.0, "hidden": 128, "after": 0, "after_fraction": 0.25, "unmoved": 0.0,
                   "obs_input": False},
    "train": {
        "seed": 0,
        "device": "auto",
        "phase1_steps": 2000,
        "phase1_batch_size": 512,
        "phase1_lr": 1e-3,
        "phase2_steps": 5000,
        "batch_size": 256,
        "lr": 3e-4,
        "weight_decay": 2e-4,
        "betas": [0.9, 0.95],
        "grad_clip": 1.0,
        "offset_only_after": 0.5,  # fraction of phase 2 after which only the offset head trains
        "log_every": 50,
        "val_every": 500,
        "ckpt_every": 1000,
    },
    "eval": {"env": None, "episodes": 50, "max_steps": None},
}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_config(name_or_path: str, seen: tuple[str, ...] = ()) -> tuple[dict, Path]:
    """One config file as written, merged over the config its ``base:`` names (a named config or a path)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"config '{name_or_path}' not found (named configs: {', '.join(named_configs())}; or give a .yaml path)")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = user.pop("base", None)
    if base is None:
        return user, path
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be a config name or path, got {base!r}")
    if str(path.resolve()) in seen:
        raise ConfigError(f"{path}: its base configs name it again ({base!r})")
    parent, _ = _read_config(base, seen + (str(path.resolve()),))
    return deep_merge(parent, user), path


def load_config(name_or_path: str, overrides: dict | None = None) -> dict:
    """Load a named config (``multipath``) or a YAML path, merged over ``DEFAULTS``.

    A config may start from another (``base: kitchen_goal``) and change only what differs: a second
    training stage is then named by what it changes, not by a copy that drifts from its base.
    """
    user, path = _read_config(name_or_path)
    cfg = deep_merge(DEFAULTS, user)
    cfg = deep_merge(cfg, overrides or {})
    validate_config(cfg, str(path))
    return cfg


def validate_config(cfg: dict, where: str = "config") -> None:
    if cfg["policy"] not in ("vqbet", "bet"):
        raise ConfigError(f"{where}: policy must be 'vqbet' or 'bet', got {cfg['policy']!r}")
    for key in ("obs_window", "action_chunk"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{where}: {key} must be an integer >= 1, got {cfg[key]!r}")
    if not cfg["data"]["obs_keys"] and not cfg["data"]["image_keys"]:
        raise ConfigError(f"{where}: data.obs_keys and data.image_keys are both empty (need at least one observation)")
    horizon = cfg["completion"].get("horizon")
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 0:
        raise ConfigError(f"{where}: completion.horizon must be an integer >= 0 (0 = no completion head), got {horizon!r}")
    after = cfg["completion"].get("after", 0)
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise ConfigError(f"{where}: completion.after must be an integer >= 0 (steps past a subtask's end), got {after!r}")
    if after and not horizon:
        raise ConfigError(f"{where}: completion.after > 0 needs the completion head: set completion.horizon >= 1")
    unmoved = cfg["completion"].get("unmoved", 0.0)
    if isinstance(unmoved, bool) or not isinstance(unmoved, (int, float)) or not 0 <= unmoved <= 1:
        raise ConfigError(f"{where}: completion.unmoved must be a number in [0, 1] (a fraction of the batch size), "
                          f"got {unmoved!r}")
    if unmoved and not horizon:
        raise ConfigError(f"{where}: completion.unmoved > 0 needs the completion head: set completion.horizon >= 1")
    if not isinstance(cfg["completion"].get("obs_input", False), bool):
        raise ConfigError(f"{where}: completion.obs_input must be true or false, got {cfg['completion']['obs_input']!r}")
    fraction = cfg["completion"].get("after_fraction", 0.25)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"{where}: completion.after_fraction must be a number in (0, 1], got {fraction!r}")
    if horizon and cfg["data"].get("goal_key") != "task_index":
        raise ConfigError(f"{where}: completion.horizon > 0 learns from subtask labels: set data.goal_key: task_index")
    if cfg["gpt"]["n_embd"] % cfg["gpt"]["n_head"]:
        raise ConfigError(f"{where}: gpt.n_embd ({cfg['gpt']['n_embd']}) must be divisible by gpt.n_head ({cfg['gpt']['n_head']})")


def set_dotted(cfg: dict, dotted: str, value) -> None:
    """Apply a ``--set a.b=value`` override (value parsed as YAML)."""
    node = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value) if isinstance(value, str) else value
