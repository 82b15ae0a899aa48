"""Episode-aware windows: an observation history and, for each history step, an action chunk.

Padding rule (the same one the run-time history buffer uses, see ``vqbet_core.history``): a history
that reaches before the episode start repeats the episode's first step; an action chunk that runs
past the episode end repeats the episode's last action. Nothing crosses an episode boundary.
"""

from __future__ import annotations

import numpy as np

from vqbet_core.errors import DatasetError


def split_episodes(n_episodes: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split episode indices into train / validation sets (by episode, never by step)."""
    if n_episodes <= 0:
        raise DatasetError("dataset is empty: no episodes to split")
    order = np.random.default_rng(seed).permutation(n_episodes)
    n_val = int(round(n_episodes * val_fraction))
    if val_fraction > 0 and n_episodes >= 2:
        n_val = max(1, min(n_val, n_episodes - 1))
    else:
        n_val = 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class SequenceSampler:
    """Index arithmetic for windows inside episodes; holds no data.

    Sample ``k`` is "step i is the current step": observations ``i-T+1 .. i`` and, for each of those
    T steps ``t``, actions ``t .. t+W-1``.
    """

    def __init__(self, episode_ends: np.ndarray, obs_window: int, action_chunk: int, episodes=None):
        if obs_window < 1 or action_chunk < 1:
            raise DatasetError(f"obs_window and action_chunk must be >= 1 (got {obs_window}, {action_chunk})")
        ends = np.asarray(episode_ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        chosen = np.arange(len(ends)) if episodes is None else np.asarray(episodes, dtype=np.int64)
        if len(chosen) == 0:
            raise DatasetError("no episodes selected for sampling")
        self.obs_window = obs_window
        self.action_chunk = action_chunk
        self.steps = np.concatenate([np.arange(starts[e], ends[e]) for e in chosen])
        self.step_start = np.concatenate([np.full(ends[e] - starts[e], starts[e]) for e in chosen])
        self.step_end = np.concatenate([np.full(ends[e] - starts[e], ends[e]) for e in chosen])

    def __len__(self) -> int:
        return len(self.steps)

    def indices(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row indices into the time-major arrays: obs ``(B, T)`` and actions ``(B, T, W)``."""
        ks = np.asarray(ks)
        cur = self.steps[ks][:, None]
        lo = self.step_start[ks][:, None]
        hi = self.step_end[ks][:, None] - 1
        t = cur + np.arange(-self.obs_window + 1, 1)[None, :]
        obs_idx = np.clip(t, lo, hi)
        act = t[:, :, None] + np.arange(self.action_chunk)[None, None, :]
        act_idx = np.clip(act, lo[:, :, None], hi[:, :, None])
        return obs_idx, act_idx
