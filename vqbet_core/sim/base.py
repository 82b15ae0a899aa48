"""The common interface of the simulated tasks (multipath, blockpush, pusht_image, kitchen).

An env produces observation dicts whose keys are dataset keys (``state`` / ``robot_joint`` vectors,
``camera_<name>`` uint8 RGB images) and takes the dataset's ``action``. Each env ships a scripted
expert with several distinct behaviour modes and the metrics the papers use for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass
class EpisodeResult:
    """What one rollout achieved; ``mode`` is the behaviour mode label (route, task order, ...)."""

    success: bool
    mode: str | None = None
    length: int = 0
    info: dict = field(default_factory=dict)


class Expert(ABC):
    """A scripted demonstrator; ``reset`` picks (at random, from ``rng``) which mode to perform."""

    @abstractmethod
    def reset(self, env: "SimEnv", rng: np.random.Generator) -> None: ...

    @abstractmethod
    def act(self, obs: dict) -> np.ndarray: ...


class SimEnv(ABC):
    name: str = "base"
    action_key: str = "action"
    # Options added after datasets had been recorded without them: option -> the value those datasets were made
    # with (their attrs lack the option's key). Lets an old checkpoint be evaluated on the scene it learnt.
    values_before_option: dict = {}

    @classmethod
    def env_args_for(cls, attrs: dict) -> dict:
        """Constructor arguments that rebuild the scene a dataset with ``attrs`` (its ``.zattrs``) was recorded on."""
        return cls.recorded_scene(attrs)[0]

    @classmethod
    def recorded_scene(cls, attrs: dict) -> tuple[dict, list[str]]:
        """(constructor arguments of the recorded scene, options the record lacks and that were filled in).

        Datasets record every constructor argument in ``env_args`` (``vqbet sim-demos``); older ones only the
        ones given on the command line, plus some as top-level attrs. An option missing from both is one the
        demos predate: it gets the value it had before the option existed (``values_before_option``).
        """
        args = dict(attrs.get("env_args") or {})
        filled = []
        if attrs.get("source") == f"sim:{cls.name}":
            for key, value in cls.values_before_option.items():
                if key in args:
                    continue
                if key in attrs:  # recorded as a top-level attribute by an older sim-demos
                    args[key] = attrs[key]
                else:
                    args[key] = value
                    filled.append(key)
        return args, filled

    @property
    @abstractmethod
    def obs_keys(self) -> list[str]:
        """Low-dim observation keys (vectors) this env emits."""

    @property
    def image_keys(self) -> list[str]:
        """``camera_<name>`` keys this env emits (empty unless images are enabled)."""
        return []

    @property
    @abstractmethod
    def action_dim(self) -> int: ...

    @property
    @abstractmethod
    def max_steps(self) -> int: ...

    @abstractmethod
    def reset(self, seed: int | None = None) -> dict:
        """Start an episode; deterministic for a given seed. Returns the first observation dict."""

    @abstractmethod
    def step(self, action: np.ndarray) -> tuple[dict, bool]:
        """Apply one action; returns (observation dict, done)."""

    @abstractmethod
    def result(self) -> EpisodeResult:
        """Outcome of the current episode so far (success, mode label, env-specific info)."""

    @abstractmethod
    def make_expert(self) -> Expert: ...

    @property
    def task_names(self) -> list[str] | None:
        """Subtask names of a long-horizon env (DESIGN.md section 9); None when episodes have no subtasks."""
        return None

    @property
    def completed(self) -> list[str]:
        """Subtasks completed so far this episode, in completion order (ground truth; empty without subtasks)."""
        return []

    def render(self) -> np.ndarray:
        """RGB frame ``(H, W, 3)`` uint8 for videos / contact sheets."""
        raise NotImplementedError(f"{self.name} has no renderer")

    def dataset_attrs(self) -> dict:
        """Attributes written into the dataset's ``.zattrs`` (joint names, control_hz, ...)."""
        return {"source": f"sim:{self.name}"}

    @staticmethod
    @abstractmethod
    def summarize(results: list[EpisodeResult], demo_modes: list[str] | None = None) -> dict:
        """The paper's metrics over rollouts, as a flat JSON-able dict.

        ``demo_modes``: the demonstrations' mode labels, for mode-frequency comparisons.
        """

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ joint-space robot protocol (optional)
    # Lets ``vqbet_core.sim.robot.SimRobot`` (and over ROS 2, ``sim_robot_node``) drive the env the way
    # ``joint_trajectory_controller`` drives an arm: joint position targets in, measured joints out.
    joint_names: list[str] = []  # empty = not drivable as a robot
    action_is_joint_target: bool = False  # True when ``step``'s action is the joint targets (joint_names order)

    def joint_positions(self) -> np.ndarray:
        """Measured joint positions, in ``joint_names`` order."""
        raise NotImplementedError(f"env '{self.name}' is not drivable as a robot (no joint_names)")

    def step_joints(self, targets: np.ndarray) -> tuple[dict, bool]:
        """One control step towards joint position ``targets`` (``joint_names`` order); like ``step``."""
        if self.action_is_joint_target:
            return self.step(targets)
        raise NotImplementedError(f"env '{self.name}' cannot be stepped from joint targets")

    # ------------------------------------------------------------------ encoder pretraining protocol (optional)
    # Lets ``vqbet_core.vision.pretrain`` make ResNet-18 weights on a machine that cannot download
    # ImageNet's: frames from random states, labelled with what the simulator knows (object poses).
    pretrain_label_names: list[str] = []  # empty = this env cannot label frames for encoder pretraining

    def pretrain_labels(self) -> np.ndarray:
        """The true scene state behind the current frame, scaled to about [-1, 1] (``pretrain_label_names`` order)."""
        raise NotImplementedError(f"env '{self.name}' has no pretraining labels")

    def random_action(self, rng: np.random.Generator) -> np.ndarray:
        """An action that moves the scene somewhere plausible, for varied pretraining frames."""
        raise NotImplementedError(f"env '{self.name}' has no random action")

    def pretrain_scene(self, rng: np.random.Generator) -> dict | None:
        """Move the just-reset scene to a random plausible state and return its observation; ``None``: the
        reset scene is random enough already (its observation is used)."""
        return None


def mode_frequencies(modes: list[str | None], keys: list[str] | None = None) -> dict[str, float]:
    """Fraction of each mode label (keys sorted; ``None`` counted as ``"none"``)."""
    labels = ["none" if m is None else m for m in modes]
    keys = sorted(set(labels) | set(keys or []))
    n = max(len(labels), 1)
    return {k: labels.count(k) / n for k in keys}
