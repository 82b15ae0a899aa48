"""Action chunks with absolute target times, and the two things a controller needs between them.

``joint_trajectory_controller`` replaces the running trajectory with each new one and never blends,
so the policy side has to:

- blend overlapping chunks (:func:`blend_chunks`): the action for a target time is the weighted mean
  of every chunk predicted so far that covers that time. Equal weights are the VQ-BeT paper's rule;
  ``mode="exp"`` weights a chunk by ``exp(-exp_weight * age)`` (age in control periods since it was
  predicted; positive favours the newest chunk, negative the oldest, as ACT does). Iterating
  ``blend_chunks`` gives exactly what :class:`vqbet_core.chunking.ChunkAverager` gives step by step,
  because each chunk carries the summed weight behind every point (``weights``);
- skip what is already in the past (:func:`drop_past`): inference and transport take time, so the
  first points of a fresh chunk may belong to control periods that have ended.

Point ``k`` of a chunk is the action for the control period ``[times[k], times[k] + period)``.
numpy only (no torch): the ROS node and the runtime use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from vqbet_core.errors import VqbetError

BLEND_MODES = ("average", "exp")


@dataclass
class ActionChunk:
    """``actions (W, A)`` float32 in joint order; ``times (W,)`` absolute seconds (``stamp + k * period``).

    ``stamp``: time of the observation the chunk was predicted from. ``weights (W,)``: summed blending
    weight behind each point (1 for a fresh chunk). ``timings``: per-stage milliseconds.
    """

    actions: np.ndarray
    times: np.ndarray
    stamp: float
    period: float
    timings: dict = field(default_factory=dict)
    weights: np.ndarray | None = None

    def __post_init__(self):
        self.actions = np.asarray(self.actions, np.float32)
        self.times = np.asarray(self.times, np.float64)
        if self.actions.ndim != 2 or self.times.shape != (self.actions.shape[0],):
            raise VqbetError(f"action chunk: actions must be (W, A) and times (W,), got {self.actions.shape} and {self.times.shape}")
        if not self.period > 0:
            raise VqbetError(f"action chunk: period must be > 0 seconds, got {self.period}")
        self.weights = np.ones(len(self.times)) if self.weights is None else np.asarray(self.weights, np.float64)

    def __len__(self) -> int:
        return len(self.times)

    def select(self, mask: np.ndarray) -> "ActionChunk":
        return replace(self, actions=self.actions[mask], times=self.times[mask], weights=self.weights[mask])


def drop_past(chunk: ActionChunk, now: float) -> ActionChunk:
    """Latency compensation: drop the points whose control period has ended by ``now``.

    The point whose period contains ``now`` is kept (it is the one to execute now). The result may be
    empty when the whole chunk is stale.
    """
    return chunk.select(chunk.times + chunk.period > float(now) + 1e-9)


def blend_chunks(prev: ActionChunk | None, new: ActionChunk, mode: str = "average", exp_weight: float = 0.0) -> ActionChunk:
    """Blend ``new`` with the running blended chunk ``prev``; returns a chunk on ``new``'s time grid.

    Points overlap when their target times are within half a control period. ``prev`` points outside
    ``new`` (earlier ones: already in the past) are dropped. ``mode="average"``: equal weights (the
    paper); ``mode="exp"``: older predictions are down-weighted by ``exp(-exp_weight * age)``.
    """
    if mode not in BLEND_MODES:
        raise VqbetError(f"blend mode must be one of {BLEND_MODES}, got {mode!r}")
    if prev is None or len(prev) == 0 or len(new) == 0:
        return replace(new, weights=np.ones(len(new)))
    if prev.actions.shape[1] != new.actions.shape[1]:
        raise VqbetError(f"blend_chunks: action sizes differ ({prev.actions.shape[1]} vs {new.actions.shape[1]})")
    period = new.period
    # nearest previous point for every new point, matched by target time
    j = np.clip(np.searchsorted(prev.times, new.times), 1, len(prev.times)) - 1
    j_next = np.minimum(j + 1, len(prev.times) - 1)
    j = np.where(np.abs(prev.times[j_next] - new.times) < np.abs(prev.times[j] - new.times), j_next, j)
    overlap = np.abs(prev.times[j] - new.times) < 0.5 * period
    decay = 1.0
    if mode == "exp" and exp_weight:
        age_steps = (new.stamp - prev.stamp) / period
        decay = float(np.exp(-exp_weight * age_steps))
    w_prev = np.where(overlap, prev.weights[j] * decay, 0.0)
    w_new = new.weights
    total = w_prev + w_new
    mixed = (prev.actions[j].astype(np.float64) * w_prev[:, None] + new.actions.astype(np.float64) * w_new[:, None]) / total[:, None]
    return replace(new, actions=mixed.astype(np.float32), weights=total)
