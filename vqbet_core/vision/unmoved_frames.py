"""Image features of demo steps near a subtask's end, re-rendered with that subtask's object put back.

Why: ``completion.unmoved`` (TrainingData.unmoved_batch) shows the completion head an arm at a subtask's
end pose with the object still where it started, labelled not done. The demos never show that, so a head
trained on them alone learns the arm's pose and advances the goal when a grasp misses (traced on the state
policy: precision 0.94 -> 0.98 with these windows). A state policy gets such steps by editing the object's
dims; an image policy sees the object only in pixels, so the steps are re-rendered by the simulator that
recorded the demos (``.zattrs source: sim:<env>`` and ``env_args``) from the recorded ``state`` with the
object's dims (``task_state_dims``) reset, then encoded by the frozen encoder.

Rendering is the slow part (~35 ms a frame on a CPU), so the features are cached beside the dataset's own
(vqbet_core.vision.feature_cache), keyed by the posed states, the scene, the camera and the encoder. A real-robot
recording has no simulator to re-render from: that is a one-line error, not a silent skip.
Measured on the shipped image model: no gain (its early advances were objects stopped just short of their line,
not untouched ones; docs/explanation/benchmarks.md, "the head stage on images"): trace a policy before using it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from vqbet_core.data.store import ZarrDataset
from vqbet_core.errors import DatasetError
from vqbet_core.vision.encoder import ARCH, ImageEncoder, check_vision_config, image_size_wh
from vqbet_core.vision.feature_cache import camera_frames, default_cache_dir, load_cached, save_cached
from vqbet_core.vision.preprocess import dataset_camera_preprocess

log = logging.getLogger(__name__)


def unmoved_steps(near_task: np.ndarray, near_start: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ``(step, subtask, subtask's first step)`` an unmoved window can show: for each step ``s`` near the
    end of subtask ``k`` (``near_task[s] == k``, from vqbet_core.data.tasks.near_subtask_end), the steps
    ``s - window + 1 .. s`` from ``k``'s first step on (earlier ones are not reset). Sorted, no repeats."""
    if window < 1:
        raise DatasetError(f"unmoved window of {window} steps: expected >= 1")
    rows = set()
    for s in np.nonzero(near_task >= 0)[0]:
        k, first = int(near_task[s]), int(near_start[s])
        for x in range(max(first, int(s) - window + 1), int(s) + 1):
            rows.add((x, k, first))
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    steps, tasks, starts = (np.asarray(c, dtype=np.int64) for c in zip(*sorted(rows)))
    return steps, tasks, starts


class _Rerendered:
    """Frames rendered on demand (``__getitem__`` of a slice), so the encoder pulls them batch by batch."""

    def __init__(self, env, camera: str, size: int, states: np.ndarray):
        self.env, self.camera, self.size, self.states = env, camera, size, states

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.stack([self.env.render_state(s, self.camera, self.size) for s in self.states[sl]])


def _simulator(dataset: ZarrDataset, key: str):
    """The env that recorded ``dataset``, able to render a recorded state, or a one-line DatasetError."""
    from vqbet_core.sim import make_env

    attrs = dataset.attrs
    source = str(attrs.get("source") or "")
    if not source.startswith("sim:"):
        raise DatasetError(f"{dataset.path}: completion.unmoved with camera data/{key} re-renders demo steps in the "
                           f"simulator that recorded them; .zattrs source is {source or 'missing'!r}, expected 'sim:<env>' "
                           "(a real-robot recording cannot be re-rendered: train it with completion.unmoved: 0)")
    env = make_env(source.removeprefix("sim:"), **dict(attrs.get("env_args") or {}))
    if not hasattr(env, "render_state"):
        env.close()
        raise DatasetError(f"{dataset.path}: completion.unmoved with cameras: env '{source}' cannot render a recorded state")
    return env


def unmoved_features(dataset: ZarrDataset, key: str, encoder: ImageEncoder, vision_cfg: dict, steps: np.ndarray,
                     starts: np.ndarray, dims: list[np.ndarray], state_key: str = "state", cache_dir=None,
                     batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Features ``(M, 512)`` of camera ``key`` at each ``steps[i]``, the scene posed as ``state_key`` there with
    dims ``dims[i]`` set to their values at ``starts[i]``; from the cache when possible."""
    cfg = check_vision_config(vision_cfg)
    frames = camera_frames(dataset, key)
    camera = key.removeprefix("camera_")
    size = int(frames.shape[1])
    preprocess = dataset_camera_preprocess(dataset.attrs, key, frames.shape[1:3], image_size_wh(cfg["image_size"]))
    state = dataset.read(state_key).astype(np.float32)
    posed = state[steps].copy()
    for i, d in enumerate(dims):
        posed[i, d] = state[starts[i], d]
    # the rendered frames depend on the posed states, the scene and the camera, not on the recorded frames
    spec = {"kind": "unmoved", "version": 1, "posed": hashlib.sha256(np.ascontiguousarray(posed).tobytes()).hexdigest(),
            "scene": [dataset.attrs.get("source"), dataset.attrs.get("env_args")], "camera": camera, "size": size,
            "arch": ARCH, "encoder": encoder.fingerprint(), "preprocess": preprocess.to_dict()}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    features = load_cached(cache_dir, digest, len(steps))
    if features is not None:
        log.info("unmoved feature cache hit: %s", cache_dir / f"{digest}.npy")
        return features
    env = _simulator(dataset, key)
    try:
        log.info("rendering %d unmoved frames of %s data/%s", len(steps), dataset.path, key)
        features = encoder.encode(_Rerendered(env, camera, size, posed), preprocess, batch_size,
                                  progress=f"rendering unmoved {key}" if progress else None)
    finally:
        env.close()
    save_cached(cache_dir, digest, features, {**spec, "dataset": str(dataset.path), "key": key, "frames_rendered": len(steps)})
    return features
