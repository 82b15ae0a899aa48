"""Rollouts of a policy agent in a simulated env, and the pictures people would rather look at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqbet_core.errors import VqbetError
from vqbet_core.sim.base import EpisodeResult, SimEnv


@dataclass(frozen=True)
class SequenceSpec:
    """An operator-ordered subtask sequence for each episode (DESIGN.md section 9).

    ``order``: ``"random"`` (a random order of ``goal_count`` of the env's subtasks, drawn from the episode's
    seed) or a list of names. ``advance``: ``"model"`` (the agent's completion score through
    :class:`TaskSequencer`, as on the robot) or ``"oracle"`` (the env's ground truth).
    """

    order: str | tuple[str, ...] = "random"
    advance: str = "model"
    threshold: float = 0.5
    debounce: float = 0.16  # seconds (policy_node default; kitchen_goal: 3.24 of 4 at 0, 3.54 at 0.16)
    refractory: float = 1.0  # seconds after an advance whose scores do not count (policy_node default)

    def requested(self, env: SimEnv, seed: int) -> list[str]:
        if self.order != "random":
            return list(self.order)
        names = list(env.task_names or [])
        count = int(getattr(env, "goal_count", len(names)))
        rng = np.random.default_rng([seed, 7])
        return [names[i] for i in rng.permutation(len(names))[:count]]


def run_sequence_episode(env: SimEnv, agent, seed: int, limit: int, seq: SequenceSpec, want_frames: bool = False
                         ) -> tuple[EpisodeResult, np.ndarray, list[np.ndarray]]:
    """One episode asked to do ``seq``'s subtasks in order; the goal advances as ``seq.advance`` says.

    The episode ends when the env ends or the sequence is finished (the robot would hold). The result's
    ``info`` gains ``requested``, ``in_order`` (requested subtasks done in the requested order, counted
    from the first until the first one missing or out of order) and the advance events with the ground
    truth, for :func:`summarize_sequences`.
    """
    from vqbet_core.runtime.sequencer import TaskSequencer

    if not env.task_names:
        raise VqbetError(f"--task-sequence: env '{env.name}' has no subtasks")
    obs = env.reset(seed=seed)
    if hasattr(agent, "reseed"):
        agent.reseed(seed)
    requested = seq.requested(env, seed)
    sequencer = TaskSequencer(requested, known=list(agent.goal_vectors) or None, threshold=seq.threshold,
                              debounce=seq.debounce, refractory=seq.refractory)
    agent.reset(sequencer.current)
    period = 1.0 / float(getattr(env, "control_hz", 10.0))
    key = env.obs_keys[0]
    traj, frames = [np.asarray(obs[key]).copy()], []
    done_at: dict[str, int] = {}  # subtask -> step after which the env reported it complete
    advances: list[tuple[str, int]] = []  # (subtask left, step)
    as_goal: list[str] = []
    t = -1
    for t in range(limit):
        if want_frames:
            frames.append(env.render())
        action = agent.act(obs)
        before = len(env.completed)
        obs, done = env.step(action)
        for task in env.completed[before:]:
            done_at.setdefault(task, t)
            if task == sequencer.current:
                as_goal.append(task)  # completed while it was the goal: the signal should fire
        traj.append(np.asarray(obs[key]).copy())
        current = sequencer.current
        if seq.advance == "oracle":
            advanced = current in env.completed and sequencer.advance(t * period, "oracle")
        else:
            advanced = sequencer.update(agent.completion, t * period)
        if advanced:
            advances.append((current, t))
            if sequencer.current is not None:
                agent.set_goal(sequencer.current)
        if done or sequencer.finished:
            break
    result = env.result()
    completed = list(env.completed)
    in_order = 0
    for want, got in zip(requested, completed):
        if want != got:
            break
        in_order += 1
    result.info.update(requested=requested, in_order=in_order, advance=seq.advance, done_at=done_at,
                       advances=advances, completed_as_goal=as_goal, last_step=t)
    return result, np.stack(traj), frames


def summarize_sequences(results: list[EpisodeResult], demo_modes: list[str] | None = None) -> dict:
    """Subtasks done in the requested order (mean), split by orders seen / unseen in the demos, and the
    completion signal against the ground truth: precision (an advance on a subtask the env had completed
    by then), recall (completed current subtasks the model advanced on) and delay (steps, advance minus
    completion; negative = early).

    Recall counts only completions the episode went on past: the kitchen ends the episode on the step its
    last subtask completes, so no completion score is ever read after that one, and counting it as missed
    made the head look as if it missed one completion in five (it was the last subtask of each finished
    episode). Those are counted apart (``completions_at_episode_end``)."""
    seen_orders = {m for m in (demo_modes or []) if m}
    out: dict = {"in_order_mean": float(np.mean([r.info["in_order"] for r in results])) if results else 0.0,
                 "sequence_length": max((len(r.info["requested"]) for r in results), default=0)}
    for label, pick in (("seen", True), ("unseen", False)):
        chosen = [r.info["in_order"] for r in results if (">".join(r.info["requested"]) in seen_orders) == pick]
        out[f"in_order_mean_{label}"] = float(np.mean(chosen)) if chosen else None
        out[f"episodes_{label}"] = len(chosen)
    model_runs = [r for r in results if r.info.get("advance") == "model"]
    if model_runs:
        n_adv = hits = caught = as_goal = at_end = 0
        delays = []
        for r in model_runs:
            done_at, advanced = r.info["done_at"], {task for task, _ in r.info["advances"]}
            for task, step in r.info["advances"]:
                n_adv += 1
                hits += task in done_at and done_at[task] <= step
                if task in done_at:
                    delays.append(step - done_at[task])
            last = r.info.get("last_step")
            for task in r.info["completed_as_goal"]:
                if task not in advanced and last is not None and done_at.get(task) == last:
                    at_end += 1  # completed on the episode's last step: no score was read after it
                    continue
                as_goal += 1
                caught += task in advanced
        out["completion_precision"] = hits / n_adv if n_adv else None
        out["completion_recall"] = caught / as_goal if as_goal else None
        out["completion_delay_mean_steps"] = float(np.mean(delays)) if delays else None
        out["advances"] = n_adv
        out["completions_at_episode_end"] = at_end
    return out


def run_episode(env: SimEnv, agent, seed: int, limit: int, want_frames: bool = False,
                sequence: SequenceSpec | None = None) -> tuple[EpisodeResult, np.ndarray, list[np.ndarray]]:
    """One closed-loop episode on env seed ``seed``: result, low-dim trajectory (first obs key), frames.

    The agent's sampling generator is reseeded from the episode's seed (when it can be), so an episode's
    outcome depends on its seed only - not on which episodes ran before it or in which process.
    With ``sequence``: the goal-conditioned subtask sequence of :func:`run_sequence_episode`.
    """
    if sequence is not None:
        return run_sequence_episode(env, agent, seed, limit, sequence, want_frames)
    obs = env.reset(seed=seed)
    if hasattr(agent, "reseed"):
        agent.reseed(seed)
    goal = env.goal() if hasattr(env, "goal") and getattr(agent, "needs_goal", False) else None
    agent.reset(goal) if goal is not None else agent.reset()
    key = env.obs_keys[0]
    traj, frames = [np.asarray(obs[key]).copy()], []
    for _ in range(limit):
        if want_frames:
            frames.append(env.render())
        obs, done = env.step(agent.act(obs))
        traj.append(np.asarray(obs[key]).copy())
        if done:
            break
    return env.result(), np.stack(traj), frames


def rollout(env: SimEnv, agent, episodes: int, seed: int = 0, max_steps: int | None = None,
            frames_for: int = 0, progress: bool = False, sequence: SequenceSpec | None = None
            ) -> tuple[list[EpisodeResult], list[np.ndarray], list[list[np.ndarray]]]:
    """Run ``episodes`` closed-loop episodes (env seeds seed, seed+1, ...).

    Returns results, the low-dim trajectories (first obs key per step) and rendered frames of the first
    ``frames_for`` episodes.
    """
    from tqdm.auto import tqdm

    limit = max_steps or env.max_steps
    episodes_run = (run_episode(env, agent, seed + ep, limit, ep < frames_for, sequence) for ep in range(episodes))
    return _collect(tqdm(episodes_run, total=episodes, desc="eval", disable=not progress, dynamic_ncols=True))


def _collect(episodes_run) -> tuple[list[EpisodeResult], list[np.ndarray], list[list[np.ndarray]]]:
    """:func:`run_episode` outputs in episode order -> (results, trajectories, frames of the episodes that have them)."""
    results, trajectories, frames = [], [], []
    for result, traj, ep_frames in episodes_run:
        results.append(result)
        trajectories.append(traj)
        if ep_frames:
            frames.append(ep_frames)
    return results, trajectories, frames


@dataclass(frozen=True)
class RolloutSpec:
    """What a worker process needs to build its own agent and env (both are per-process: simulators and
    onnxruntime sessions are not shared across processes)."""

    env: str
    env_args: dict
    checkpoint: str | None = None  # torch run folder, or
    model: str | None = None  # exported model folder (onnxruntime)
    device: str = "cpu"
    temperature: float | None = None
    blend: bool | None = None
    threads: int | None = None  # intra-op threads of torch / onnxruntime in each worker (None: their default)
    precision: str | None = None  # exported model's image encoder: fp32 | int8 (None: what model.yaml names)
    sequence: SequenceSpec | None = None  # operator-ordered subtasks (vqbet eval --task-sequence)


def recorded_dataset_attrs(spec: RolloutSpec) -> dict:
    """The training dataset's ``.zattrs`` (env args, mode labels) stored with the checkpoint or exported model,
    read from its metadata alone (no weights loaded)."""
    if spec.checkpoint:
        from vqbet_core.train.checkpoint import load_meta

        meta = load_meta(Path(spec.checkpoint))[1]
    else:
        from vqbet_core.runtime.spec import load_spec

        meta = load_spec(spec.model, verify_hashes=False).meta
    return meta.get("dataset_attrs") or {}


def evaluation_scene(env: str, attrs: dict, overrides: dict) -> tuple[dict, list[str]]:
    """(every constructor argument of the scene to evaluate on, one-line notices about how it was chosen).

    The scene is the one the training demos were recorded on (``attrs``: their ``.zattrs`` as kept by the
    checkpoint or model), changed only by ``overrides`` (``--env-arg``). Each argument where the evaluation
    scene differs from the recorded one is named with both values; options the record lacks are said to be
    so, never silently taken from today's defaults.
    """
    from vqbet_core.sim import _plain, env_class, scene_args

    recorded, filled = env_class(env).recorded_scene(attrs)
    scene = scene_args(env, **{**recorded, **overrides})
    notices = []
    for key in filled:
        if key not in overrides:
            notices.append(f"the training demos have no record of {env}'s {key} option (they predate it); "
                           f"evaluating with {key}={scene[key]!r}, its value before the option existed "
                           f"(--env-arg {key}=... to change)")
    changed = [f"{k}={scene[k]!r} (demos: {recorded[k]!r})" for k in sorted(recorded)
               if k in scene and scene[k] != _plain(recorded[k])]
    if changed:
        notices.append(f"evaluating on a scene that differs from the training demos': {', '.join(changed)}")
    unrecorded = sorted(set(scene) - set(recorded) - set(overrides))
    if unrecorded and attrs.get("env_args") is not None and attrs.get("source") == f"sim:{env}":
        notices.append(f"the training demos record no value for {', '.join(unrecorded)}; evaluating with "
                       f"today's defaults: {', '.join(f'{k}={scene[k]!r}' for k in unrecorded)}")
    return scene, notices


def make_agent(spec: RolloutSpec, seed: int = 0):
    """The agent ``spec`` names: :class:`TorchAgent` for a checkpoint, :class:`RuntimeAgent` for a model."""
    if spec.checkpoint:
        from vqbet_core.agent import TorchAgent

        return TorchAgent(spec.checkpoint, device=spec.device, temperature=spec.temperature, seed=seed, blend=spec.blend)
    from vqbet_core.runtime.agent import RuntimeAgent

    return RuntimeAgent(spec.model, temperature=spec.temperature, seed=seed, blend=spec.blend, threads=spec.threads,
                        precision=spec.precision)


_WORKER: dict = {}


def _init_worker(spec: RolloutSpec, limit: int | None, frames_for: int) -> None:
    import torch

    from vqbet_core.sim import make_env

    if spec.threads:
        torch.set_num_threads(spec.threads)
    env = make_env(spec.env, **spec.env_args)
    _WORKER.update(env=env, agent=make_agent(spec), limit=limit or env.max_steps, frames_for=frames_for,
                   sequence=spec.sequence)


def _worker_episode(job: tuple[int, int]):
    ep, seed = job
    w = _WORKER
    return run_episode(w["env"], w["agent"], seed, w["limit"], ep < w["frames_for"], w["sequence"])


def parallel_rollout(spec: RolloutSpec, episodes: int, workers: int, seed: int = 0, max_steps: int | None = None,
                     frames_for: int = 0, progress: bool = False
                     ) -> tuple[list[EpisodeResult], list[np.ndarray], list[list[np.ndarray]]]:
    """:func:`rollout` spread over ``workers`` processes, one episode per job, results in episode order.

    Each episode reseeds the agent from its env seed, so the results equal a single-process
    :func:`rollout` of the same agent episode for episode (tests check it).
    """
    import multiprocessing

    from tqdm.auto import tqdm

    ctx = multiprocessing.get_context("spawn")  # simulators and torch threads do not survive a fork
    jobs = [(ep, seed + ep) for ep in range(episodes)]
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec, max_steps, frames_for)) as pool:
        return _collect(tqdm(pool.imap(_worker_episode, jobs), total=episodes, desc="eval", disable=not progress,
                             dynamic_ncols=True))


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
