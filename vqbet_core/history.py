"""Observation history buffer used at run time (torch rollouts and the onnxruntime runtime alike).

Padding rule, identical to ``vqbet_core.data.sampler``: until ``window`` steps have been seen, the
history is filled by repeating the first observation of the episode. ``reset()`` starts an episode.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class ObservationHistory:
    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"history window must be >= 1, got {window}")
        self.window = window
        self._items: deque[np.ndarray] = deque(maxlen=window)

    def reset(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, obs: np.ndarray) -> np.ndarray:
        """Add the newest observation; returns the padded history ``(window, *obs.shape)``."""
        obs = np.asarray(obs)
        if self._items and obs.shape != self._items[-1].shape:
            raise ValueError(f"observation shape changed within an episode: {self._items[-1].shape} -> {obs.shape}")
        self._items.append(obs)
        return self.stacked()

    def stacked(self) -> np.ndarray:
        if not self._items:
            raise ValueError("history is empty: push an observation first")
        items = list(self._items)
        pad = [items[0]] * (self.window - len(items))
        return np.stack(pad + items, axis=0)
