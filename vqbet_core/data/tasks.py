"""Per-step subtask labels of long-horizon demonstrations (DESIGN.md section 9), from "subtask done" marks.

Why hindsight: whoever records knows which subtask was being done only when it is done (the operator
presses "done", the simulator reports the task complete). Every step up to and including the step a
subtask is marked done belongs to that subtask; the next step starts the next one. The same function
labels simulator demos (``vqbet sim-demos``), ROS recordings (the recorder's marks) and bags
(``bag2zarr``'s marker topic), so the three cannot disagree.

The completion target (what the policy's completion head learns) is derived from the same labels:
step ``i`` is positive when its subtask is marked done within the next ``horizon`` steps, i.e. the
subtask "ends soon". Why this and not a progress fraction: the node needs a yes/no decision with a
threshold and a debounce; a near-end label trains exactly that decision, needs no guess of how long a
subtask takes, and its positives sit where the decision is made.

"Ends soon" alone fires before the subtask is done (measured: ~3 steps early with a 3-step horizon,
and an advance before the door crossed the line costs that subtask). :func:`finished_subtask` adds
the states that show a subtask *done*: the first ``after`` steps of the next subtask, shown to the
head with the finished subtask as the goal and labelled done - the robot's own question after each
step, "is what I was asked for done now?". Demos never hold a finished goal, so these windows train
the head only, never the actions.
"""

from __future__ import annotations

import numpy as np

from vqbet_core.errors import VqbetError


def task_index_from_marks(n_steps: int, marks: list[tuple[int, str]], task_names: list[str]) -> np.ndarray:
    """``task_index`` (int64, ``n_steps``) from ``marks``: ``(step, task name)`` where that task was done.

    ``step`` is the index of the last step of the subtask (the action after which it was complete).
    Steps after the last mark have no finished subtask to belong to: they get ``-1`` (callers either
    end the episode at the last mark, as the simulator does, or keep -1 = "no subtask").
    """
    index = np.full(n_steps, -1, dtype=np.int64)
    start = 0
    for step, name in sorted(marks, key=lambda m: m[0]):
        if name not in task_names:
            raise VqbetError(f"subtask mark '{name}': expected one of the task names {list(task_names)}")
        if not 0 <= step < n_steps:
            raise VqbetError(f"subtask mark '{name}' at step {step}: expected a step in 0..{n_steps - 1}")
        index[start : step + 1] = task_names.index(name)
        start = step + 1
    return index


def marks_from_task_index(task_index: np.ndarray, task_names: list[str]) -> list[tuple[int, str]]:
    """The inverse of :func:`task_index_from_marks` for one episode: ``(last step, name)`` of each subtask run."""
    marks = []
    ti = np.asarray(task_index)
    for i in range(len(ti)):
        if ti[i] >= 0 and (i + 1 == len(ti) or ti[i + 1] != ti[i]):
            marks.append((i, task_names[int(ti[i])]))
    return marks


def subtask_runs(task_index: np.ndarray, episode_ends: np.ndarray):
    """Each run of one subtask in each episode: ``(episode start, episode labels, first step, last step)``,
    steps counted within the episode. A run ends where the label changes or the episode ends; ``-1`` steps
    belong to no run."""
    ti = np.asarray(task_index)
    start = 0
    for end in np.asarray(episode_ends, dtype=np.int64):
        ep = ti[start:end]
        firsts = np.nonzero((ep >= 0) & (np.insert(ep[:-1], 0, -2) != ep))[0]
        lasts = np.nonzero((ep >= 0) & (np.append(ep[1:], -2) != ep))[0]
        for run_first, last in zip(firsts, lasts):
            yield start, ep, int(run_first), int(last)
        start = int(end)


def completion_targets(task_index: np.ndarray, episode_ends: np.ndarray, horizon: int) -> np.ndarray:
    """float32 (N,): 1 where the step's subtask ends within ``horizon`` steps (this one included), else 0.

    A subtask ends at the last step of its run in an episode. Steps with ``task_index == -1`` get 0.
    """
    if horizon < 1:
        raise VqbetError(f"completion horizon must be >= 1 step, got {horizon}")
    out = np.zeros(len(task_index), dtype=np.float32)
    for start, _, _, last in subtask_runs(task_index, episode_ends):
        out[start + max(0, last - horizon + 1) : start + last + 1] = 1.0
    return out


def one_hot_goals(task_index: np.ndarray, n_tasks: int) -> np.ndarray:
    """Goal vectors (float32, N x n_tasks): the current subtask as a one-hot vector (zeros for -1)."""
    ti = np.asarray(task_index, dtype=np.int64)
    if ti.size and (ti.max() >= n_tasks or ti.min() < -1):
        raise VqbetError(f"task_index holds {int(ti.min())}..{int(ti.max())}: expected -1..{n_tasks - 1} (task_names has {n_tasks})")
    goals = np.zeros((len(ti), n_tasks), dtype=np.float32)
    rows = np.nonzero(ti >= 0)[0]
    goals[rows, ti[rows]] = 1.0
    return goals


def named_goal_vectors(task_names: list[str]) -> dict[str, list[float]]:
    """One goal vector per task name (its one-hot row): what the operator asks for by name."""
    eye = np.eye(len(task_names), dtype=np.float32)
    return {name: eye[i].tolist() for i, name in enumerate(task_names)}


def finished_subtask(task_index: np.ndarray, episode_ends: np.ndarray, after: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step: the subtask that ended at most ``after`` steps before it (-1 if none) and the step it ended at.

    ``(task (N,) int64, end (N,) int64)``. Step ``s`` qualifies when the nearest earlier subtask end ``e``
    in the same episode has ``1 <= s - e <= after`` and ``s`` belongs to a subtask (``task_index >= 0``).
    """
    if after < 0:
        raise VqbetError(f"completion after must be >= 0 steps, got {after}")
    task = np.full(len(task_index), -1, dtype=np.int64)
    end_at = np.full(len(task_index), -1, dtype=np.int64)
    for start, ep, _, last in subtask_runs(task_index, episode_ends):
        for s in range(last + 1, min(last + after, len(ep) - 1) + 1):
            if ep[s] >= 0:
                task[start + s] = ep[last]
                end_at[start + s] = start + last
    return task, end_at


def near_subtask_end(task_index: np.ndarray, episode_ends: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step: the subtask whose end lies within ``span`` steps of it (-1 if none) and that run's first step.

    ``(task (N,) int64, start (N,) int64)``. A step qualifies in the last ``span`` steps of its own subtask's
    run or in the first ``span`` steps past a run's end (while it belongs to a subtask); its own run wins.
    These are the steps where the arm looks as it does when a subtask is done (TrainingData.unmoved_batch).
    """
    if span < 1:
        raise VqbetError(f"span must be >= 1 step, got {span}")
    task = np.full(len(task_index), -1, dtype=np.int64)
    first = np.full(len(task_index), -1, dtype=np.int64)
    runs = list(subtask_runs(task_index, episode_ends))
    for start, ep, run_first, last in runs:
        past = np.arange(last + 1, min(last + span, len(ep) - 1) + 1)
        past = past[(ep[past] >= 0) & (task[start + past] < 0)]
        task[start + past], first[start + past] = ep[last], start + run_first
    for start, ep, run_first, last in runs:  # a step's own run wins over the previous one's end
        own = np.arange(max(run_first, last - span + 1), last + 1)
        task[start + own], first[start + own] = ep[last], start + run_first
    return task, first
