"""Rollouts of a policy agent in a simulated env, and the pictures people would rather look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vqbet_core.sim.base import EpisodeResult, SimEnv


def rollout(env: SimEnv, agent, episodes: int, seed: int = 0, max_steps: int | None = None,
            frames_for: int = 0, progress: bool = False) -> tuple[list[EpisodeResult], list[np.ndarray], list[list[np.ndarray]]]:
    """Run ``episodes`` closed-loop episodes (env seeds seed, seed+1, ...).

    Returns results, the low-dim trajectories (first obs key per step) and rendered frames of the first
    ``frames_for`` episodes.
    """
    from tqdm.auto import tqdm

    results, trajectories, frames = [], [], []
    limit = max_steps or env.max_steps
    key = env.obs_keys[0]
    for ep in tqdm(range(episodes), desc="eval", disable=not progress, dynamic_ncols=True):
        obs = env.reset(seed=seed + ep)
        goal = env.goal() if hasattr(env, "goal") and getattr(agent, "needs_goal", False) else None
        agent.reset(goal) if goal is not None else agent.reset()
        traj, ep_frames = [np.asarray(obs[key]).copy()], []
        for _ in range(limit):
            if ep < frames_for:
                ep_frames.append(env.render())
            obs, done = env.step(agent.act(obs))
            traj.append(np.asarray(obs[key]).copy())
            if done:
                break
        results.append(env.result())
        trajectories.append(np.stack(traj))
        if ep_frames:
            frames.append(ep_frames)
    return results, trajectories, frames


def contact_sheet(frames: list[np.ndarray], out_png: str | Path, columns: int = 8, rows: int = 4) -> Path:
    """Evenly spaced frames of one episode tiled into one PNG."""
    import cv2

    idx = np.linspace(0, len(frames) - 1, min(len(frames), columns * rows)).astype(int)
    tiles = [frames[i] for i in idx]
    h, w = tiles[0].shape[:2]
    sheet = np.zeros((h * int(np.ceil(len(tiles) / columns)), w * min(columns, len(tiles)), 3), np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    cv2.imwrite(str(out_png), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return Path(out_png)


def write_video(frames: list[np.ndarray], out_path: str | Path, fps: float = 10.0) -> Path:
    import cv2

    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return Path(out_path)


def plot_mode_frequencies(freq: dict[str, float], demo_freq: dict[str, float] | None, out_png: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(set(freq) | set(demo_freq or {}))
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(keys) + 2), 3.5))
    ax.bar(x - 0.2, [freq.get(k, 0) for k in keys], 0.4, label="policy")
    if demo_freq is not None:
        ax.bar(x + 0.2, [demo_freq.get(k, 0) for k in keys], 0.4, label="demonstrations")
    ax.set_xticks(x, keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("frequency")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
