"""Turning a stream of predicted action chunks into one action per control step.

``ChunkAverager``: the VQ-BeT paper's rule - the action for step t is the equal-weight mean of
every chunk predicted at steps t-W+1 .. t that covers t. ``exp_weight != 0`` switches to exponential
temporal ensembling with weights exp(-exp_weight * age) (age in steps since the chunk was predicted):
positive values favour the newest prediction, negative ones the oldest (ACT's choice). numpy only:
used by torch rollouts and the onnxruntime runtime alike.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class ChunkAverager:
    def __init__(self, chunk: int, exp_weight: float = 0.0):
        self.chunk = chunk
        self.exp_weight = exp_weight
        self._chunks: deque[np.ndarray] = deque(maxlen=chunk)

    def reset(self) -> None:
        self._chunks.clear()

    def add(self, chunk: np.ndarray) -> np.ndarray:
        """Add the chunk predicted at the current step; returns the blended action for this step."""
        self._chunks.append(np.asarray(chunk))
        return self.current()

    def current(self) -> np.ndarray:
        n = len(self._chunks)
        # chunk i (oldest first) was predicted (n-1-i) steps ago; its entry for now is index n-1-i
        preds = np.stack([c[n - 1 - i] for i, c in enumerate(self._chunks)])
        ages = np.arange(n - 1, -1, -1, dtype=np.float64)
        w = np.exp(-self.exp_weight * ages) if self.exp_weight else np.ones(n)
        return (preds * (w / w.sum())[:, None]).sum(0).astype(preds.dtype)
