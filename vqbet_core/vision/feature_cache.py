"""Frozen-encoder features, computed once per dataset and camera and cached on disk.

Why: with a frozen ResNet-18 the feature of a frame never changes, yet a training step would
otherwise push batch x obs_window frames through it (tens of ms per frame on a CPU) at every step.
Here every committed frame of ``data/<key>`` is encoded once; the result is stored as
``<cache_dir>/<hash>.npy`` where the hash covers the frames (raw zarr chunk bytes, or the decoded
frames when the store is not a local folder), the committed length, the encoder weights and the image
preprocessing. Any change to the data or to the encoder settings gives a new hash: a stale cache
can never be used. Episode boundaries are left out of the hash on purpose: features are per frame.

``python -m vqbet_core.vision.feature_cache --bench`` prints the speed-up as one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np

from vqbet_core.data.store import ZarrDataset
from vqbet_core.errors import DatasetError, VqbetError
from vqbet_core.vision.encoder import ARCH, FEATURE_DIM, ImageEncoder, check_vision_config, image_size_wh
from vqbet_core.vision.preprocess import ImagePreprocess, dataset_camera_preprocess

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$VQBET_CACHE/features`` (``~/.cache/vqbet/features`` when unset), read at call time so a later
    ``VQBET_CACHE`` applies; the one default for training, scripts and tests alike."""
    return Path(os.environ.get("VQBET_CACHE") or "~/.cache/vqbet").expanduser() / "features"

_HASH_BLOCK = 1024  # frames per block when hashing decoded frames


class _Committed:
    """The committed frames ``[0, n)`` of a zarr array (leftovers of an interrupted write are excluded)."""

    def __init__(self, array, n: int):
        self.array, self.n = array, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.asarray(self.array[sl.start : min(sl.stop, self.n)])


def _raw_chunk_hash(array, n: int) -> str | None:
    """sha256 of the stored (compressed) chunk bytes covering steps ``[0, n)``; None if not a local zarr v2 array."""
    try:
        from zarr.storage import LocalStore

        meta = array.metadata
        if not isinstance(array.store, LocalStore) or meta.zarr_format != 2:
            return None
        folder = Path(array.store.root) / array.path
        sep = meta.dimension_separator or "."
        codec = {"compressor": meta.compressor.get_config() if meta.compressor else None,
                 "filters": [f.get_config() for f in meta.filters or ()],
                 "fill_value": str(meta.fill_value), "order": meta.order, "chunks": list(meta.chunks)}
    except (ImportError, AttributeError):
        return None
    h = hashlib.sha256(json.dumps(codec, sort_keys=True, default=str).encode())
    chunks = meta.chunks
    first_dim = range(-(-n // chunks[0]))
    other_dims = [range(-(-s // c)) for s, c in zip(array.shape[1:], chunks[1:])]
    for index in product(first_dim, *other_dims):
        name = sep.join(str(i) for i in index)
        h.update(name.encode())
        try:
            h.update((folder / name).read_bytes())
        except FileNotFoundError:  # never written: reads back as fill_value
            h.update(b"\0missing")
    return "raw:" + h.hexdigest()


def data_fingerprint(dataset: ZarrDataset, key: str) -> str:
    """Content hash of the committed frames of ``data/<key>`` (plus their count, shape and dtype)."""
    array = dataset.array(key)
    n = dataset.n_steps
    head = f"{key}|{n}|{tuple(array.shape[1:])}|{array.dtype}"
    raw = _raw_chunk_hash(array, n)
    if raw is None:
        h = hashlib.sha256()
        for s in range(0, n, _HASH_BLOCK):
            h.update(np.ascontiguousarray(array[s : min(s + _HASH_BLOCK, n)]).tobytes())
        raw = "frames:" + h.hexdigest()
    return hashlib.sha256(f"{head}|{raw}".encode()).hexdigest()


def cache_key(dataset: ZarrDataset, key: str, encoder: ImageEncoder | str, preprocess: ImagePreprocess) -> str:
    """The hash naming the cache file: data, encoder weights (or their fingerprint) and preprocessing (mean/std/size)."""
    fingerprint = encoder if isinstance(encoder, str) else encoder.fingerprint()
    spec = {"version": CACHE_VERSION, "arch": ARCH, "feature_dim": FEATURE_DIM, "data": data_fingerprint(dataset, key),
            "encoder": fingerprint, "preprocess": preprocess.to_dict()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def camera_frames(dataset: ZarrDataset, key: str):
    """``data/<key>`` checked to be RGB uint8 ``(N, H, W, 3)`` frames."""
    array = dataset.array(key)
    if len(array.shape) != 4 or array.shape[3] != 3 or np.dtype(array.dtype) != np.uint8:
        raise DatasetError(f"{dataset.path}: data/{key} must be RGB uint8 (N, H, W, 3) frames, got {array.dtype} {tuple(array.shape)}")
    return array


def encoded_features(dataset, key: str, encoder: ImageEncoder, vision_cfg: dict, cache_dir=None,
                     batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Features ``(N, 512)`` float32 of every committed frame of ``data/<key>``, from the cache when possible.

    ``dataset`` is a :class:`ZarrDataset` or a path; ``cache_dir`` defaults to ``$VQBET_CACHE/features``
    (``~/.cache/vqbet/features``).
    """
    if not isinstance(dataset, ZarrDataset):
        dataset = ZarrDataset.open(dataset, mode="r")
    cfg = check_vision_config(vision_cfg)
    if cfg["finetune"] or encoder.finetune:
        raise VqbetError("feature cache needs a frozen encoder, but vision.finetune is true (fine-tuning encodes frames every step)")
    n = dataset.n_steps
    if n == 0:
        raise DatasetError(f"{dataset.path}: dataset is empty (no committed episodes)")
    array = camera_frames(dataset, key)
    preprocess = dataset_camera_preprocess(dataset.attrs, key, array.shape[1:3], image_size_wh(cfg["image_size"]))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fingerprint = encoder.fingerprint()
    digest = cache_key(dataset, key, fingerprint, preprocess)
    features = load_cached(cache_dir, digest, n)
    if features is not None:
        log.info("feature cache hit: %s data/%s -> %s", dataset.path, key, cache_dir / f"{digest}.npy")
        return features
    log.info("feature cache miss: encoding %d frames of %s data/%s", n, dataset.path, key)
    features = encoder.encode(_Committed(array, n), preprocess, batch_size, progress=f"encoding {key}" if progress else None)
    save_cached(cache_dir, digest, features, {"dataset": str(dataset.path), "key": key, "frames": n, "encoder": fingerprint,
                                              "preprocess": preprocess.to_dict()})
    return features


def load_cached(cache_dir: Path, digest: str, n: int) -> np.ndarray | None:
    """Features ``(n, 512)`` float32 stored under ``digest``, or None (missing, wrong shape or unreadable)."""
    path = cache_dir / f"{digest}.npy"
    if not path.exists():
        return None
    try:
        features = np.load(path)
    except (OSError, ValueError) as exc:
        log.warning("feature cache %s unreadable (%s): re-encoding", path, exc)
        return None
    if features.shape != (n, FEATURE_DIM) or features.dtype != np.float32:
        log.warning("feature cache %s has %s %s, expected float32 (%d, %d): re-encoding", path, features.dtype,
                    features.shape, n, FEATURE_DIM)
        return None
    return features


def save_cached(cache_dir: Path, digest: str, features: np.ndarray, info: dict) -> None:
    """Store ``features`` as ``<digest>.npy`` (atomic: a crash never leaves a half-written file under the real
    name) with ``info`` beside it in ``<digest>.json`` (what was encoded, for a person looking at the cache)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{digest}.{os.getpid()}.tmp.npy"
    np.save(tmp, features)
    os.replace(tmp, cache_dir / f"{digest}.npy")
    (cache_dir / f"{digest}.json").write_text(json.dumps({**info, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


# ---------------------------------------------------------------------- benchmark
def bench_feature_cache(frames: int = 600, episodes: int = 6, image_size: int = 96, batch: int = 32, window: int = 5,
                        steps: int = 5, train_steps: int = 5000, threads: int = 2) -> dict:
    """Training-step cost of running ResNet-18 on every batch vs gathering cached features.

    Both paths start from data in memory (frames preloaded as uint8) and end with the ``(B, T, 512)``
    feature tensor a training step consumes; the cached path also pays the one-time encoding.
    """
    import tempfile

    import torch

    from vqbet_core.data.sampler import SequenceSampler
    from vqbet_core.vision.encoder import build_encoder

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    base = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.int16)
    vision_cfg = {"weights": "none", "image_size": image_size}
    encoder = build_encoder(vision_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ds = ZarrDataset.create(Path(tmp) / "bench.zarr")
        per = frames // episodes
        for _ in range(episodes):
            shift = rng.integers(0, 255, size=(per, 1, 1, 3))
            imgs = ((base[None] + shift + rng.integers(0, 8, size=(per, image_size, image_size, 3))) % 256).astype(np.uint8)
            ds.add_episode({"camera_front": imgs, "action": rng.normal(size=(per, 2)).astype(np.float32)})
        images = ds.read("camera_front")
        pre = ImagePreprocess(size=(image_size, image_size))
        sampler = SequenceSampler(ds.episode_ends, window, 1)
        batches = [sampler.indices(rng.integers(0, len(sampler), size=batch))[0] for _ in range(steps)]

        def naive_step(obs_idx):
            with torch.no_grad():
                x = torch.from_numpy(pre.to_model_input(images[obs_idx.reshape(-1)]))
                return encoder(x).reshape(batch, window, FEATURE_DIM)

        naive_step(batches[0])  # warm-up
        t = time.perf_counter()
        for obs_idx in batches:
            naive_step(obs_idx)
        naive = (time.perf_counter() - t) / steps

        t = time.perf_counter()
        feats = encoded_features(ds, "camera_front", encoder, vision_cfg, Path(tmp) / "cache", progress=False)
        build = time.perf_counter() - t
        t = time.perf_counter()
        feats = encoded_features(ds, "camera_front", encoder, vision_cfg, Path(tmp) / "cache", progress=False)
        hit = time.perf_counter() - t
        many = [sampler.indices(rng.integers(0, len(sampler), size=batch))[0] for _ in range(200)]
        t = time.perf_counter()
        for obs_idx in many:
            torch.from_numpy(feats[obs_idx])
        cached = (time.perf_counter() - t) / len(many)
        ref = naive_step(batches[0]).numpy()
        max_diff = float(np.max(np.abs(feats[batches[0]] - ref)))
    return {
        "bench": "feature_cache", "frames": per * episodes, "image_size": image_size, "batch": batch, "obs_window": window,
        "frames_per_step": batch * window, "threads": threads,
        "naive_ms_per_step": round(1e3 * naive, 3), "cached_ms_per_step": round(1e3 * cached, 4),
        "step_speedup": round(naive / cached, 1), "cache_build_s": round(build, 3), "cache_hit_s": round(hit, 4),
        "break_even_steps": round(build / max(naive - cached, 1e-9), 2),
        "train_steps": train_steps, "naive_total_s": round(naive * train_steps, 1),
        "cached_total_s": round(build + cached * train_steps, 1),
        "total_speedup": round(naive * train_steps / (build + cached * train_steps), 1),
        "max_abs_diff_cached_vs_naive": max_diff,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vqbet_core.vision.feature_cache", description="Frozen-encoder feature cache.")
    parser.add_argument("--bench", action="store_true", help="measure cached features vs ResNet-18 every step; prints one JSON line")
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="naive training steps to time")
    parser.add_argument("--train-steps", type=int, default=5000, help="training length used for the projected totals")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 1
    print(json.dumps(bench_feature_cache(args.frames, 6, args.image_size, args.batch, args.window, args.steps,
                                         args.train_steps, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
