"""The onnxruntime policy runtime: exported model folder in, timestamped action chunks out. No torch.

One control step is ``observe()`` (normalize the low-dim keys, crop/resize/normalize each camera frame
and encode it once, on arrival, fuse, push into the history buffer) then ``predict()`` (run the policy
graph on the padded history, sample codes with a seeded numpy generator, decode, unnormalize). The
steps and the helpers (``Normalizer``, ``ImagePreprocess``, ``fuse_observation``,
``ObservationHistory``) are the ones training uses, so training and run time cannot drift apart.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from vqbet_core.errors import VqbetError
from vqbet_core.history import ObservationHistory
from vqbet_core.runtime.chunks import ActionChunk, blend_chunks, drop_past
from vqbet_core.runtime.sampling import choose_codes, decode_codes
from vqbet_core.runtime.session import GraphRunner, SessionSettings, resolve_providers
from vqbet_core.runtime.spec import ModelSpec, check_encoder_graph, check_policy_graph, load_spec
from vqbet_core.vision.fusion import fuse_observation

log = logging.getLogger("vqbet.runtime")

def encoder_precision(spec: ModelSpec, precision: str | None) -> str:
    """``precision`` (fp32 | int8), or the model's choice (``encoder_precision`` in model.yaml, else fp32)."""
    chosen = precision or str(spec.meta.get("encoder_precision") or "fp32")
    if chosen not in ("fp32", "int8"):
        raise VqbetError(f"encoder precision {chosen!r}: expected fp32 or int8")
    if chosen == "int8" and spec.encoder_int8_file is None:
        raise VqbetError(f"{spec.path}: has no int8 encoder (make one with `vqbet quantize {spec.path} --data D.zarr`)")
    return chosen


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


class PolicyRuntime:
    """Load a model folder; ``observe`` every control step, ``predict`` an action chunk when wanted.

    ``providers``: None = TensorRT > CUDA > CPU as available. ``seed``: the sampling generator's seed.
    ``temperature``: None = the model's default (0 = argmax). ``threads``: onnxruntime intra-op threads
    (None = onnxruntime's default). ``settings``: how the graphs run (spinning, warm-up, IO binding, TensorRT
    fp16 and engine cache; ``vqbet_core.runtime.session``), threads included.
    """

    def __init__(self, model_dir: str | Path, providers: list[str] | None = None, seed: int = 0,
                 temperature: float | None = None, threads: int | None = None, precision: str | None = None,
                 settings: SessionSettings | None = None):
        self.spec: ModelSpec = load_spec(model_dir)
        spec = self.spec
        wanted = resolve_providers(providers)
        if settings is None:
            settings = SessionSettings(threads=threads)
        elif threads is not None:
            raise VqbetError("PolicyRuntime: pass threads inside settings, not both")
        self.settings = settings
        self.policy_graph = GraphRunner(spec.policy_file, wanted, [], settings)
        self.policy_session = self.policy_graph.session
        self._outputs = check_policy_graph(spec, self.policy_session)
        self.policy_graph.outputs = list(self._outputs)
        example = {"obs": np.zeros((1, spec.obs_window, spec.obs_dim), np.float32)}
        if spec.goal_dim:
            example["goal"] = np.zeros((1, spec.goal_dim), np.float32)
        self.policy_graph.prepare(example)
        self.encoder_graph = None
        self.encoder_session = None
        self.precision = "fp32"
        if spec.image_keys:
            self.precision = encoder_precision(spec, precision)
            path = spec.encoder_file if self.precision == "fp32" else spec.encoder_int8_file
            self.encoder_graph = GraphRunner(path, wanted, [], settings)
            self.encoder_session = self.encoder_graph.session
            check_encoder_graph(spec, self.encoder_session)
            self._encoder_in = self.encoder_session.get_inputs()[0].name
            self.encoder_graph.outputs = [self.encoder_session.get_outputs()[0].name]
            w, h = spec.preprocess[spec.image_keys[0]].size
            self.encoder_graph.prepare({self._encoder_in: np.zeros((len(spec.image_keys), 3, h, w), np.float32)})
        # what onnxruntime registered per graph (a GPU provider that failed to load is absent here)
        self.graph_providers = {"policy": self.policy_graph.providers}
        if self.encoder_graph is not None:
            self.graph_providers["encoder"] = self.encoder_graph.providers
        self.providers = list(self.policy_session.get_providers())
        self.normalizer = self.spec.normalizer
        self.temperature = self.spec.temperature if temperature is None else float(temperature)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.history = ObservationHistory(self.spec.obs_window)
        self.goal: np.ndarray | None = None  # normalized (1, G)
        self.goal_name: str | None = None
        self.blended: ActionChunk | None = None
        self.last_stamp: float | None = None
        self.last_timings: dict[str, float] = {}
        self._observe_timings: dict[str, float] = {}
        self.completion: float | None = None  # the last predict()'s completion score (models with the head)
        log.info("vqbet runtime: model %s (%s, %s) on onnxruntime providers %s (IO binding %s)", self.spec.path,
                 self.spec.kind, "images " + ",".join(self.spec.image_keys) if self.spec.image_keys else "state only",
                 self.graph_providers, "on" if self.policy_graph.bound else "off")

    # ------------------------------------------------------------------ episode and goal
    def reset(self, goal=None) -> None:
        """Start an episode: clear the history and chunk blending; ``goal`` (when given) replaces the goal."""
        self.history.reset()
        self.blended = None
        self.last_stamp = None
        self.last_timings = {}
        self._observe_timings = {}
        self.completion = None
        if goal is not None:
            self.set_goal(goal)

    def set_goal(self, goal) -> None:
        """A goal name from ``spec.goal_names`` or a raw goal vector of ``spec.goal_dim`` numbers (history kept)."""
        spec = self.spec
        if goal is None:
            self.goal, self.goal_name = None, None
            return
        if not spec.goal_dim:
            raise VqbetError(f"goal: model {spec.name} is not goal-conditioned (goal_dim=0), got {goal!r}")
        name = None
        if isinstance(goal, str):
            if goal not in spec.goal_vectors:
                known = ", ".join(spec.goal_names) or "none (pass goal vectors)"
                raise VqbetError(f"goal: unknown goal name '{goal}' (this model knows: {known})")
            name, goal = goal, spec.goal_vectors[goal]
        vec = np.asarray(goal, dtype=np.float32).reshape(-1)
        if vec.shape != (spec.goal_dim,) or not np.all(np.isfinite(vec)):
            raise VqbetError(f"goal: expected {spec.goal_dim} finite numbers, got shape {np.shape(goal)}")
        self.goal = self.normalizer.normalize("goal", vec)[None].astype(np.float32)
        self.goal_name = name

    # ------------------------------------------------------------------ observation
    def _lowdim(self, lowdim: dict) -> dict[str, np.ndarray]:
        spec = self.spec
        if set(lowdim) != set(spec.obs_keys):
            raise VqbetError(f"observation keys {sorted(lowdim)} do not match the model's low-dim keys {spec.obs_keys}")
        out = {}
        for key in spec.obs_keys:
            value = np.asarray(lowdim[key], dtype=np.float32)
            d = spec.obs_dims[key]
            if value.size != d or value.ndim > 2 or value.shape[-1:] != (d,):
                raise VqbetError(f"observation '{key}': expected shape ({d},), got {value.shape}")
            if not np.isfinite(value).all():
                raise VqbetError(f"observation '{key}': contains non-finite values (NaN or inf)")
            out[key] = self.normalizer.normalize(key, value.reshape(1, d))
        return out

    def _encode(self, images: dict) -> tuple[dict[str, np.ndarray], float, float]:
        spec = self.spec
        if set(images) != set(spec.image_keys):
            raise VqbetError(f"image keys {sorted(images)} do not match the model's cameras {spec.image_keys}")
        if not spec.image_keys:
            return {}, 0.0, 0.0
        t0 = time.perf_counter()
        batch = []
        for key in spec.image_keys:
            frame = images[key]
            if not isinstance(frame, np.ndarray):
                raise VqbetError(f"image '{key}': expected a numpy RGB uint8 (H, W, 3) array, got {type(frame).__name__}")
            try:
                small = spec.preprocess[key].crop_resize(frame)
            except VqbetError as exc:
                raise VqbetError(f"image '{key}': {exc}") from None
            batch.append(spec.preprocess[key].to_model_input(small))
        x = np.stack(batch)
        t_pre = _ms(t0)
        t1 = time.perf_counter()
        feats = self.encoder_graph.run({self._encoder_in: x})[0]
        t_enc = _ms(t1)
        return {k: self.normalizer.normalize(k, feats[i : i + 1]) for i, k in enumerate(spec.image_keys)}, t_pre, t_enc

    def encoder_features(self, x: np.ndarray) -> np.ndarray:
        """Raw encoder features of preprocessed model inputs ``(N, 3, H, W)`` (no normalization)."""
        return self.encoder_graph.run({self._encoder_in: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def observe(self, lowdim: dict, images: dict | None = None, stamp: float = 0.0) -> None:
        """Push one observation step (raw units; camera frames raw RGB uint8). ``stamp``: its time in seconds."""
        stamp = float(stamp)
        if not math.isfinite(stamp):
            raise VqbetError(f"observation stamp must be a finite time in seconds, got {stamp}")
        t0 = time.perf_counter()
        low = self._lowdim(lowdim or {})
        t_low = _ms(t0)
        feats, t_pre, t_enc = self._encode(images or {})
        t2 = time.perf_counter()
        fused = fuse_observation(low, feats, self.spec.obs_keys, self.spec.image_keys)[0]
        self.history.push(fused)
        self.last_stamp = stamp
        self._observe_timings = {"preprocess": t_low + t_pre + _ms(t2), "encoder": t_enc}

    # ------------------------------------------------------------------ prediction
    def heads(self) -> dict[str, np.ndarray]:
        """The deterministic policy outputs for the current history (and goal), batch of one."""
        if len(self.history) == 0:
            raise VqbetError("predict: no observation yet (call observe() first)")
        feed = {"obs": self.history.stacked()[None].astype(np.float32, copy=False)}
        if self.spec.goal_dim:
            if self.goal is None:
                names = ", ".join(self.spec.goal_names)
                raise VqbetError(f"this model is goal-conditioned: set a goal first (reset(goal=...) or set_goal(); names: {names or 'vectors only'})")
            feed["goal"] = self.goal
        return dict(zip(self._outputs, self.policy_graph.run(feed)))

    def choose_codes(self, heads: dict[str, np.ndarray]) -> np.ndarray:
        return choose_codes(heads["logits"][0], heads["secondary_given_primary"][0] if "secondary_given_primary" in heads else None,
                            self.temperature, self.rng, self.spec.sequential)

    def decode(self, heads: dict[str, np.ndarray], codes: np.ndarray) -> np.ndarray:
        """Codes -> unnormalized action chunk ``(W, A)``."""
        flat = decode_codes(self.spec.decode_table, heads["offsets"][0], codes)
        return self.normalizer.unnormalize("action", flat.reshape(self.spec.action_chunk, self.spec.action_dim)).astype(np.float32)

    def predict(self, now: float | None = None) -> ActionChunk:
        """Sample, decode and time-stamp a chunk from the current history; ``now`` drops already-past points."""
        t0 = time.perf_counter()
        heads = self.heads()
        t_policy = _ms(t0)
        if "completion" in heads:  # P(the current subtask ends within the model's completion horizon)
            self.completion = float(heads["completion"][0])
        t1 = time.perf_counter()
        actions = self.decode(heads, self.choose_codes(heads))
        t_sample = _ms(t1)
        if not np.all(np.isfinite(actions)):
            raise VqbetError("predict: the model produced non-finite actions")
        timings = {"preprocess": 0.0, "encoder": 0.0, **self._observe_timings, "policy": t_policy, "sample_decode": t_sample}
        timings["total"] = sum(timings.values())
        self.last_timings = timings
        period = self.spec.period
        chunk = ActionChunk(actions, self.last_stamp + period * np.arange(self.spec.action_chunk), self.last_stamp, period, dict(timings))
        return chunk if now is None else drop_past(chunk, now)

    def predict_blended(self, now: float | None = None, mode: str = "average", exp_weight: float = 0.0) -> ActionChunk:
        """``predict`` then blend with the previous blended chunk (kept here; cleared by ``reset``)."""
        self.blended = blend_chunks(self.blended, self.predict(now), mode, exp_weight)
        return self.blended
