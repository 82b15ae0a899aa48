"""Training tensors: a dataset loaded once, normalized and fused, sampled as windows on the device.

Low-dim datasets fit in memory many times over, and image observations are reduced to cached
512-d features (``vqbet_core.vision.feature_cache``) before training, so every batch is a pure
index-gather on the device: no DataLoader workers, no per-step decoding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqbet_core.data.normalize import Normalizer
from vqbet_core.data.sampler import SequenceSampler, split_episodes
from vqbet_core.data.store import ZarrDataset


def dataset_hash(ds: ZarrDataset, keys: list[str]) -> str:
    """Content hash of the committed part of ``keys`` plus episode_ends (identifies the training data)."""
    h = hashlib.sha256(ds.episode_ends.tobytes())
    for key in sorted(keys):
        h.update(key.encode())
        arr = ds.array(key)
        step = max(1, 65536 // max(1, int(np.prod(arr.shape[1:]))))
        for start in range(0, ds.n_steps, step):
            h.update(np.ascontiguousarray(arr[start : min(start + step, ds.n_steps)]).tobytes())
    return h.hexdigest()[:16]


@dataclass
class Batch:
    obs: torch.Tensor  # (B, T, D)
    goal: torch.Tensor | None  # (B, G)
    actions: torch.Tensor  # (B, T, W, A)
    done: torch.Tensor | None = None  # (B, T) completion targets, NaN where a step is another subtask's
    # windows just past a subtask's end with that subtask as the goal: (obs (b, T, D), goal (b, G), done (b, T));
    # for the completion head only (completion.after, vqbet_core.data.tasks.finished_subtask)
    finished: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class TrainingData:
    """Everything phase 1 and phase 2 sample from, already normalized and fused."""

    def __init__(self, cfg: dict, data_path: str | Path, device: torch.device, cache_dir: str | Path | None = None,
                 normalizer: Normalizer | None = None, encoder=None, progress: bool = True):
        dcfg = cfg["data"]
        self.path = Path(data_path)
        ds = ZarrDataset.open(self.path, "r")
        required = list(dcfg["obs_keys"]) + list(dcfg["image_keys"]) + [dcfg["action_key"]]
        if dcfg.get("goal_key"):
            required.append(dcfg["goal_key"])
        ds.validate(required)
        self.dataset_attrs = ds.attrs
        self.episode_ends = ds.episode_ends
        self.n_episodes = ds.n_episodes
        lowdim = {k: ds.read(k).astype(np.float32).reshape(ds.n_steps, -1) for k in dcfg["obs_keys"]}
        actions = ds.read(dcfg["action_key"]).astype(np.float32).reshape(ds.n_steps, -1)
        features = {}
        if dcfg["image_keys"]:
            from vqbet_core.vision.feature_cache import encoded_features

            for key in dcfg["image_keys"]:  # cache_dir None: $VQBET_CACHE/features (feature_cache.default_cache_dir)
                features[key] = encoded_features(ds, key, encoder, cfg["vision"], cache_dir, progress=progress)
        self.task_index = None
        if dcfg.get("goal_key") == "task_index":  # goal = the current subtask, one-hot over task_names
            goal = self._subtask_goals(ds)
        else:
            goal = ds.read(dcfg["goal_key"]).astype(np.float32).reshape(ds.n_steps, -1) if dcfg.get("goal_key") else None
        self.data_hash = dataset_hash(ds, required)

        if normalizer is None:
            to_fit = {**lowdim, **features, "action": actions}
            if goal is not None:
                to_fit["goal"] = goal
            normalizer = Normalizer.fit(to_fit)
            if self.task_index is not None:  # one-hot subtask goals stay as they are: a subtask seen in few
                g = goal.shape[1]            # demos would otherwise get a near-zero std and a huge input
                normalizer.stats["goal"] = {"mean": np.zeros(g, np.float32), "std": np.ones(g, np.float32)}
        self.normalizer = normalizer
        from vqbet_core.vision.fusion import fuse_observation

        obs = fuse_observation({k: normalizer.normalize(k, v) for k, v in lowdim.items()},
                               {k: normalizer.normalize(k, v) for k, v in features.items()},
                               dcfg["obs_keys"], dcfg["image_keys"])
        self.obs_dim = obs.shape[1]
        self.action_dim = actions.shape[1]
        self.goal_dim = 0 if goal is None else goal.shape[1]
        self.device = device
        self.obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
        self.actions = torch.as_tensor(normalizer.normalize("action", actions), dtype=torch.float32, device=device)
        self.goal = None if goal is None else torch.as_tensor(normalizer.normalize("goal", goal), dtype=torch.float32, device=device)

        self.done = None
        horizon = int((cfg.get("completion") or {}).get("horizon") or 0)
        if horizon and self.task_index is not None:
            from vqbet_core.data.tasks import completion_targets

            done = completion_targets(self.task_index, self.episode_ends, horizon)
            self.done = torch.as_tensor(done, dtype=torch.float32, device=device)
            self.task_index_t = torch.as_tensor(self.task_index, device=device)
        ccfg = cfg.get("completion") or {}
        self.after = int(ccfg.get("after") or 0) if self.done is not None else 0
        self.after_fraction = float(ccfg.get("after_fraction", 0.25))
        self.unmoved = float(ccfg.get("unmoved") or 0.0) if self.done is not None else 0.0
        if self.after or self.unmoved:
            from vqbet_core.data.tasks import one_hot_goals

            eye = one_hot_goals(np.arange(self.goal_dim), self.goal_dim)
            self.goal_of_task = torch.as_tensor(normalizer.normalize("goal", eye), dtype=torch.float32, device=device)
        if self.after:
            from vqbet_core.data.tasks import finished_subtask

            task, end_at = finished_subtask(self.task_index, self.episode_ends, self.after)
            self.finished_task, self.finished_end = task, end_at
        if self.unmoved:
            self._setup_unmoved(cfg, ds, lowdim, features, encoder, cache_dir, progress)

        train_eps, val_eps = split_episodes(self.n_episodes, float(dcfg["val_fraction"]), seed=int(cfg["train"]["seed"]))
        self.train_episodes, self.val_episodes = train_eps, val_eps
        T, W = int(cfg["obs_window"]), int(cfg["action_chunk"])
        self.train = SequenceSampler(self.episode_ends, T, W, train_eps)
        self.val = SequenceSampler(self.episode_ends, T, W, val_eps) if len(val_eps) else None

    def batch(self, sampler: SequenceSampler, ks: np.ndarray) -> Batch:
        obs_idx, act_idx = sampler.indices(ks)
        obs_idx_t = torch.as_tensor(obs_idx, device=self.device)
        act_idx_t = torch.as_tensor(act_idx, device=self.device)
        goal = None if self.goal is None else self.goal[obs_idx_t[:, -1]]
        done = None
        if self.done is not None:  # steps of another subtask than the goal's (the last step's) are not scored
            ti = self.task_index_t[obs_idx_t]
            done = torch.where(ti == ti[:, -1:], self.done[obs_idx_t], torch.full_like(self.done[obs_idx_t], float("nan")))
        return Batch(self.obs[obs_idx_t], goal, self.actions[act_idx_t], done)

    def _setup_unmoved(self, cfg: dict, ds: ZarrDataset, lowdim: dict, features: dict, encoder, cache_dir, progress: bool) -> None:
        """Where each subtask's object lives (from ``.zattrs task_state_dims``): its columns in the fused
        observation for low-dim configs; for camera configs, the steps near each subtask's end re-rendered
        with the object put back (vqbet_core.vision.unmoved_frames), fused as ``unmoved_obs``."""
        from vqbet_core.data.tasks import near_subtask_end
        from vqbet_core.errors import DatasetError
        from vqbet_core.vision.fusion import fusion_layout

        dcfg = cfg["data"]
        recorded = self.dataset_attrs.get("task_state_dims")
        if not isinstance(recorded, dict) or not recorded:
            raise DatasetError(f"{self.path}: completion.unmoved needs .zattrs task_state_dims ({{obs key: {{subtask: "
                               f"[state dims]}}}}, written by vqbet sim-demos for the kitchen), got {recorded!r}")
        names = list(self.dataset_attrs["task_names"])
        dims_of = {}  # (obs key, task) -> dims, checked against the key's width
        for key, per_task in recorded.items():
            width = lowdim[key].shape[1] if key in lowdim else (int(np.prod(ds.array(key).shape[1:])) if key in ds.keys else None)
            if width is None:
                continue  # a recorded observation this dataset no longer holds
            for name, dims in per_task.items():
                if name in names:
                    if not all(isinstance(d, int) and 0 <= d < width for d in dims):
                        raise DatasetError(f"{self.path}: task_state_dims[{key!r}][{name!r}] = {dims!r}: expected "
                                           f"indices into the {width} values of '{key}'")
                    dims_of[(key, names.index(name))] = list(dims)
        layout = fusion_layout({**{k: v.shape[1] for k, v in lowdim.items()}, **{k: v.shape[1] for k, v in features.items()}},
                               dcfg["obs_keys"], dcfg["image_keys"])
        cols: dict[int, list[int]] = {}
        for (key, task), dims in dims_of.items():
            if key in layout:
                cols.setdefault(task, []).extend(layout[key][0] + d for d in dims)
        rendered = {task: dims for (key, task), dims in dims_of.items() if key == "state"} if dcfg["image_keys"] else {}
        if not cols and not rendered:
            raise DatasetError(f"{self.path}: completion.unmoved: task_state_dims names no dims of this config's "
                               f"observations ({', '.join(layout)})")
        self.unmoved_cols = {k: torch.as_tensor(v, device=self.device) for k, v in cols.items()}
        task, first = near_subtask_end(self.task_index, self.episode_ends, max(1, self.after or 10))
        task[~np.isin(task, list(set(cols) | set(rendered)))] = -1  # subtasks without known dims get no such windows
        self.near_task, self.near_start = task, first
        self.unmoved_obs = None
        if rendered:
            self._render_unmoved(cfg, ds, lowdim, encoder, cache_dir, progress, rendered)

    def _render_unmoved(self, cfg: dict, ds: ZarrDataset, lowdim: dict, encoder, cache_dir, progress: bool,
                        dims_of_task: dict[int, list[int]]) -> None:
        """``unmoved_obs`` (M, obs_dim): the fused observation of every step an unmoved window shows, cameras
        re-rendered with the window's subtask's object at its start; ``unmoved_row`` (N, tasks) finds the row."""
        from vqbet_core.vision.fusion import fuse_observation
        from vqbet_core.vision.unmoved_frames import unmoved_features, unmoved_steps

        dcfg = cfg["data"]
        steps, tasks, starts = unmoved_steps(self.near_task, self.near_start, int(cfg["obs_window"]))
        feats = {key: unmoved_features(ds, key, encoder, cfg["vision"], steps, starts,
                                       [np.asarray(dims_of_task[int(t)]) for t in tasks], cache_dir=cache_dir,
                                       progress=progress) for key in dcfg["image_keys"]}
        n = self.normalizer
        obs = fuse_observation({k: n.normalize(k, v[steps]) for k, v in lowdim.items()},
                               {k: n.normalize(k, v) for k, v in feats.items()}, dcfg["obs_keys"], dcfg["image_keys"])
        self.unmoved_obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        self.unmoved_row = np.full((len(self.task_index), self.goal_dim), -1, dtype=np.int64)
        self.unmoved_row[steps, tasks] = np.arange(len(steps))

    def _subtask_goals(self, ds: ZarrDataset) -> np.ndarray:
        """One-hot goals from ``data/task_index`` and ``task_names``; names their vectors for export."""
        from vqbet_core.data.tasks import named_goal_vectors, one_hot_goals
        from vqbet_core.errors import DatasetError

        names = ds.attrs.get("task_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{self.path}: data.goal_key task_index needs .zattrs task_names (a list of subtask "
                               f"names), got {names!r}")
        self.task_index = ds.read("task_index").astype(np.int64).reshape(-1)
        self.dataset_attrs = {**self.dataset_attrs, "goal_vectors": named_goal_vectors(names)}
        return one_hot_goals(self.task_index, len(names))

    def random_batch(self, sampler: SequenceSampler, batch_size: int, rng: np.random.Generator) -> Batch:
        b = self.batch(sampler, rng.integers(0, len(sampler), size=batch_size))
        if self.after:
            eligible = self._finished_windows(sampler)
            if len(eligible):
                n = max(1, int(round(batch_size * self.after_fraction)))
                b.finished = self.finished_batch(sampler, eligible[rng.integers(0, len(eligible), size=n)])
        if self.unmoved:
            eligible = self._unmoved_windows(sampler)
            if len(eligible):
                n = max(1, int(round(batch_size * self.unmoved)))
                extra = self.unmoved_batch(sampler, eligible[rng.integers(0, len(eligible), size=n)])
                b.finished = extra if b.finished is None else tuple(torch.cat(p) for p in zip(b.finished, extra))
        return b

    def _windows_where(self, sampler: SequenceSampler, per_step: np.ndarray, name: str) -> np.ndarray:
        """Sample indices of ``sampler`` whose current step has ``per_step >= 0`` (cached per ``name``)."""
        cache = self.__dict__.setdefault("_window_cache", {})
        if (name, id(sampler)) not in cache:
            obs_idx, _ = sampler.indices(np.arange(len(sampler)))
            cache[(name, id(sampler))] = np.nonzero(per_step[obs_idx[:, -1]] >= 0)[0]
        return cache[(name, id(sampler))]

    def _unmoved_windows(self, sampler: SequenceSampler) -> np.ndarray:
        """Sample indices of ``sampler`` whose current step lies near a subtask's end."""
        return self._windows_where(sampler, self.near_task, "unmoved")

    def unmoved_batch(self, sampler: SequenceSampler, ks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows around a subtask's end, that subtask as goal, its object's dims put back to where they were
        when it started, on every step: the arm looks done, the object says not done, done = 0 (NaN on steps
        of an earlier subtask). Why: the demos never show an arm at a subtask's end pose with the object
        unmoved, so a head trained on them alone learned the arm's pose and fired when a grasp missed."""
        obs_idx, _ = sampler.indices(ks)
        last = obs_idx[:, -1]
        task, first = self.near_task[last], self.near_start[last]
        obs = self.obs[torch.as_tensor(obs_idx, device=self.device)].clone()
        if self.unmoved_obs is not None:  # cameras: the re-rendered steps, from the subtask's first step on
            shown = obs_idx >= first[:, None]
            rows = self.unmoved_row[obs_idx, task[:, None]][shown]
            if (rows < 0).any():
                raise RuntimeError("unmoved window asks for a step that was not re-rendered (unmoved_steps out of step)")
            obs[torch.as_tensor(shown, device=self.device)] = self.unmoved_obs[torch.as_tensor(rows, device=self.device)]
        for k, cols in self.unmoved_cols.items():
            rows = np.nonzero(task == k)[0]
            if len(rows):
                r = torch.as_tensor(rows, device=self.device)
                start_values = self.obs[torch.as_tensor(first[rows], device=self.device)][:, cols]  # (n, c)
                sub = obs[r]
                sub[:, :, cols] = start_values[:, None, :]
                obs[r] = sub
        goal = self.goal_of_task[torch.as_tensor(task, device=self.device)]
        done = torch.as_tensor(np.where(obs_idx >= first[:, None], 0.0, np.nan), dtype=torch.float32, device=self.device)
        return obs, goal, done

    def _finished_windows(self, sampler: SequenceSampler) -> np.ndarray:
        """Sample indices of ``sampler`` whose current step lies just past a subtask's end."""
        return self._windows_where(sampler, self.finished_task, "finished")

    def finished_batch(self, sampler: SequenceSampler, ks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows ending just past a subtask's end, the finished subtask as goal: done = 1 on the steps after
        that end, NaN (not scored) on the steps up to it (they are the subtask's own, scored as usual)."""
        obs_idx, _ = sampler.indices(ks)
        last = obs_idx[:, -1]
        goal = self.goal_of_task[torch.as_tensor(self.finished_task[last], device=self.device)]
        after_end = obs_idx > self.finished_end[last][:, None]
        done = torch.as_tensor(np.where(after_end, 1.0, np.nan), dtype=torch.float32, device=self.device)
        return self.obs[torch.as_tensor(obs_idx, device=self.device)], goal, done

    def chunks(self, sampler: SequenceSampler, ks: np.ndarray) -> torch.Tensor:
        """Action chunks ``(B, W, A)`` starting at each sample's current step (phase-1 input)."""
        _, act_idx = sampler.indices(ks)
        return self.actions[torch.as_tensor(act_idx[:, -1], device=self.device)]

    def all_chunks(self) -> tuple[np.ndarray, np.ndarray]:
        """Every normalized training action ``(N, A)`` and chunk ``(N, W, A)`` (for k-means / code init)."""
        ks = np.arange(len(self.train))
        chunks = self.chunks(self.train, ks).cpu().numpy()
        return self.actions[torch.as_tensor(self.train.steps, device=self.device)].cpu().numpy(), chunks
