"""``RuntimeAgent``: the onnxruntime runtime behind the ``act(obs) / reset(goal)`` API of ``TorchAgent``.

``vqbet eval --model DIR`` rolls out an exported model exactly as the robot runs it: same runtime,
same chunk blending (``blend_chunks`` with equal weights = the paper's averaging), with simulated time
``step / control_hz`` as the observation stamps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vqbet_core.errors import VqbetError
from vqbet_core.runtime.policy import PolicyRuntime


class RuntimeAgent:
    def __init__(self, model_dir: str | Path, temperature: float | None = None, seed: int = 0, blend: bool | None = None,
                 providers: list[str] | None = None, threads: int | None = None, precision: str | None = None):
        self.runtime = PolicyRuntime(model_dir, providers=providers, seed=seed, temperature=temperature, threads=threads,
                                     precision=precision)
        self.model = self.runtime.spec  # .meta = the model.yaml dict
        self.blend = self.model.blend != "none" if blend is None else blend
        self.needs_goal = self.model.goal_dim > 0
        self.step = 0

    def reseed(self, seed: int) -> None:
        """Restart the runtime's sampling generator (see :meth:`vqbet_core.agent.TorchAgent.reseed`)."""
        self.runtime.rng = np.random.default_rng(int(seed))

    def reset(self, goal=None) -> None:
        self.runtime.reset(goal)
        self.step = 0

    def set_goal(self, goal) -> None:
        """Change the goal (a name or a vector) mid-episode, keeping the history (the next subtask)."""
        self.runtime.set_goal(goal)

    @property
    def goal_vectors(self) -> dict:
        return self.model.goal_vectors

    @property
    def completion(self) -> float | None:
        """The last step's completion score, or None for a model without the completion head."""
        return self.runtime.completion

    def act(self, obs: dict) -> np.ndarray:
        """One control step: the action to apply now (blended over the overlapping chunks)."""
        spec = self.model
        missing = [k for k in spec.obs_keys + spec.image_keys if k not in obs]
        if missing:
            raise VqbetError(f"observation is missing key(s) {missing} (model expects {spec.obs_keys + spec.image_keys})")
        stamp = self.step * spec.period
        self.runtime.observe({k: obs[k] for k in spec.obs_keys}, {k: obs[k] for k in spec.image_keys}, stamp)
        self.step += 1
        chunk = self.runtime.predict_blended() if self.blend else self.runtime.predict()
        return chunk.actions[0].copy()
