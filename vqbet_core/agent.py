"""Closed-loop control with a torch checkpoint (for ``vqbet eval`` and export parity checks).

Same steps as the onnxruntime runtime: normalize, encode images, fuse, push into the history buffer,
sample codes, decode, unnormalize, blend overlapping chunks with equal weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vqbet_core.chunking import ChunkAverager
from vqbet_core.errors import VqbetError
from vqbet_core.history import ObservationHistory


class TorchAgent:
    def __init__(self, run_dir: str | Path, device: str = "cpu", temperature: float | None = None, seed: int = 0,
                 blend: bool | None = None):
        from vqbet_core.train.checkpoint import load_policy

        self.policy, self.normalizer, self.cfg, self.meta, self.encoder = load_policy(Path(run_dir), device)
        self.device = torch.device(device)
        self.temperature = self.cfg["sampling"]["temperature"] if temperature is None else temperature
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.history = ObservationHistory(self.policy.obs_window)
        if blend is None:  # the config's default: average overlapping chunks (the paper) or not
            blend = self.cfg["sampling"].get("blend", "average") != "none"
        self.blender = ChunkAverager(self.policy.action_chunk) if blend else None
        self.obs_keys = self.meta["obs_keys"]
        self.image_keys = self.meta["image_keys"]
        self.goal = None
        self.completion: float | None = None  # the last step's completion score (models with the head)
        if self.image_keys:
            from vqbet_core.vision.preprocess import ImagePreprocess

            size = int(self.cfg["vision"]["image_size"])
            self.preprocess = ImagePreprocess(size=(size, size))

    def reseed(self, seed: int) -> None:
        """Restart the code-sampling generator (rollouts reseed per episode, so episodes are reproducible alone)."""
        self.generator.manual_seed(int(seed))

    def reset(self, goal=None) -> None:
        self.history.reset()
        if self.blender is not None:
            self.blender.reset()
        self.completion = None
        self.goal = None
        if goal is not None:
            self.set_goal(goal)

    @property
    def goal_vectors(self) -> dict:
        """Named goals of the training data (``goal_vectors`` in its attrs), name -> raw vector."""
        raw = (self.meta.get("dataset_attrs") or {}).get("goal_vectors") or {}
        return {str(k): np.asarray(v, np.float32) for k, v in raw.items()}

    def set_goal(self, goal) -> None:
        """A goal name (from ``goal_vectors``) or a raw goal vector; the history is kept."""
        if isinstance(goal, str):
            if goal not in self.goal_vectors:
                raise VqbetError(f"goal: unknown goal name '{goal}' (this model knows: {', '.join(self.goal_vectors) or 'none'})")
            goal = self.goal_vectors[goal]
        self.goal = goal

    def fuse(self, obs: dict) -> np.ndarray:
        from vqbet_core.vision.fusion import fuse_observation

        for key in self.obs_keys + self.image_keys:
            if key not in obs:
                raise VqbetError(f"observation is missing key '{key}' (model expects {self.obs_keys + self.image_keys})")
        lowdim = {k: self.normalizer.normalize(k, np.asarray(obs[k], np.float32).reshape(1, -1)) for k in self.obs_keys}
        feats = {}
        for key in self.image_keys:
            img = self.preprocess.crop_resize(np.asarray(obs[key]))
            x = torch.from_numpy(self.preprocess.to_model_input(img[None])).to(self.device)
            with torch.no_grad():
                f = self.encoder(x).cpu().numpy()
            feats[key] = self.normalizer.normalize(key, f)
        return fuse_observation(lowdim, feats, self.obs_keys, self.image_keys)[0]

    @torch.no_grad()
    def predict_chunk(self, obs: dict) -> np.ndarray:
        """Push the observation and return the unnormalized chunk ``(W, A)`` predicted for this step."""
        hist = self.history.push(self.fuse(obs).astype(np.float32))
        x = torch.from_numpy(hist[None]).to(self.device)
        goal = None
        if self.policy.goal_dim:
            if self.goal is None:
                raise VqbetError("this model is goal-conditioned: pass a goal to reset(goal=...)")
            goal = torch.from_numpy(self.normalizer.normalize("goal", np.asarray(self.goal, np.float32))[None]).to(self.device)
        chunk, heads = self.policy.predict(x, goal, temperature=self.temperature, generator=self.generator, return_heads=True)
        self.completion = None if heads.completion is None else float(heads.completion[0])
        chunk = chunk[0].cpu().numpy()
        return self.normalizer.unnormalize("action", chunk)

    def act(self, obs: dict) -> np.ndarray:
        chunk = self.predict_chunk(obs)
        return self.blender.add(chunk) if self.blender is not None else chunk[0]
