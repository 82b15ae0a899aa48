"""Zarr dataset store (DESIGN.md section 3): the diffusion_policy ReplayBuffer layout, zarr format 2.

Why this shape: an episode becomes visible only when ``meta/episode_ends`` is extended, so a crash in
the middle of an episode leaves arrays that are longer than ``episode_ends[-1]``; opening the store
for writing truncates those leftovers. Readers only ever look at ``[0, episode_ends[-1])``.

Writers stream steps straight into the arrays (``append_steps``) and then ``commit_episode`` or
``discard_episode``: an hour of teleoperation never has to sit in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import numcodecs
import numpy as np
import zarr

from vqbet_core.errors import DatasetError

SCHEMA_VERSION = 1
FLOAT_KEYS_CHECKED = ("action", "robot_joint", "state")
_LOWDIM_CHUNK = 4096


def _compressor(is_image: bool):
    if is_image:
        return numcodecs.Blosc(cname="lz4", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)


def is_image_key(key: str) -> bool:
    return key.startswith("camera_")


def write_whole_frame_chunks(arr: zarr.Array, start: int, values: np.ndarray) -> bool:
    """Write ``values`` (one step per chunk) to ``arr[start:]`` as chunk files; False if not applicable.

    Why: image arrays have one frame per chunk (the contract, so readers can fetch single frames), and
    zarr-python 3 spends ~0.6 ms of asyncio bookkeeping on each chunk it writes - most of ``bag2zarr``'s
    time. For the case this store creates (format 2 on a local directory, no filters, C order, chunk =
    one whole step) the chunk file is just the array's own compressor applied to the frame's bytes, at
    the key ``"{step}.0.0..."``; this writes exactly that (tests compare it byte for byte with zarr's
    own write). Anything else returns False and goes through zarr.
    """
    meta = arr.metadata
    store_path = arr.store_path
    root = getattr(store_path.store, "root", None)
    if (getattr(meta, "zarr_format", None) != 2 or root is None or meta.filters or meta.order != "C"
            or meta.compressor is None or tuple(meta.chunks) != (1,) + tuple(arr.shape[1:])
            or values.dtype != arr.dtype or not getattr(store_path.store, "supports_writes", False)):
        return False
    folder = Path(root) / store_path.path
    suffix = (meta.dimension_separator or ".").join([""] + ["0"] * (values.ndim - 1))
    encode = meta.compressor.encode
    for i, frame in enumerate(values):
        with open(folder / f"{start + i}{suffix}", "wb") as f:
            f.write(encode(np.ascontiguousarray(frame)))
    return True


class ZarrDataset:
    """A dataset store: ``data/<key>`` arrays plus ``meta/episode_ends``.

    Open with :meth:`create` (new store), :meth:`open` (read or append). ``mode='r'`` never writes;
    ``mode='a'`` recovers from an interrupted write by truncating leftovers.
    """

    def __init__(self, root: zarr.Group, path: Path, mode: str):
        self.root = root
        self.path = path
        self.mode = mode
        self._pending = 0  # steps written past episode_ends[-1] that are not committed yet
        self.recovered_steps = 0  # leftover steps of an interrupted episode truncated by open(mode='a')

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | os.PathLike, attrs: Mapping | None = None, overwrite: bool = False) -> "ZarrDataset":
        path = Path(path)
        if path.exists() and not overwrite:
            raise DatasetError(f"{path}: already exists (use ZarrDataset.open to append, or overwrite=True)")
        root = zarr.open_group(str(path), mode="w", zarr_format=2)
        root.require_group("data")
        meta = root.require_group("meta")
        meta.create_array("episode_ends", shape=(0,), dtype="int64", chunks=(_LOWDIM_CHUNK,), compressors=None)
        root.attrs.update({"schema_version": SCHEMA_VERSION, **dict(attrs or {})})
        return cls(root, path, "a")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "ZarrDataset":
        """Open an existing store; ``mode='a'`` truncates leftovers of an interrupted episode."""
        path = Path(path)
        if not path.exists():
            raise DatasetError(f"{path}: dataset not found")
        try:
            root = zarr.open_group(str(path), mode="r" if mode == "r" else "r+", zarr_format=2)
        except Exception as exc:  # zarr raises many kinds here; the user needs one line
            raise DatasetError(f"{path}: not a zarr format 2 dataset ({type(exc).__name__}: {exc})") from None
        if "meta" not in root or "episode_ends" not in root["meta"]:
            raise DatasetError(f"{path}: missing meta/episode_ends (expected the ReplayBuffer layout)")
        if "data" not in root:
            raise DatasetError(f"{path}: missing data/ group")
        ds = cls(root, path, mode)
        if mode != "r":
            ds._repair_interrupted_commit()
        ds._check_episode_ends()
        ds.recovered_steps = ds.recover() if mode != "r" else 0
        return ds

    def _repair_interrupted_commit(self) -> None:
        # zarr's append resizes meta/episode_ends before writing the new entry: a crash in between leaves
        # a trailing fill value (0) that is not an episode end; that episode was never committed.
        ends = self.root["meta/episode_ends"]
        n = ends.shape[0]
        if n:
            values = np.asarray(ends[:], dtype=np.int64)
            while n and values[n - 1] <= (values[n - 2] if n > 1 else 0):
                n -= 1
            if n != ends.shape[0]:
                ends.resize((n,))

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, attrs: Mapping | None = None) -> "ZarrDataset":
        path = Path(path)
        if path.exists():
            ds = cls.open(path, mode="a")
            if attrs:
                ds.update_attrs(attrs)
            return ds
        return cls.create(path, attrs)

    # ------------------------------------------------------------------ structure
    @property
    def episode_ends(self) -> np.ndarray:
        return np.asarray(self.root["meta/episode_ends"][:], dtype=np.int64)

    @property
    def n_episodes(self) -> int:
        return int(self.root["meta/episode_ends"].shape[0])

    @property
    def n_steps(self) -> int:
        ends = self.root["meta/episode_ends"]
        return int(ends[-1]) if ends.shape[0] else 0

    @property
    def keys(self) -> list[str]:
        return sorted(self.root["data"].array_keys())

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    def update_attrs(self, attrs: Mapping) -> None:
        self.root.attrs.update(dict(attrs))

    def episode_slices(self) -> list[slice]:
        ends = self.episode_ends
        starts = np.concatenate([[0], ends[:-1]])
        return [slice(int(s), int(e)) for s, e in zip(starts, ends)]

    def array(self, key: str):
        """The committed part of ``data/<key>`` as a lazy zarr array slice source."""
        if key not in self.root["data"]:
            raise DatasetError(f"{self.path}: missing key data/{key} (has: {', '.join(self.keys) or 'none'})")
        return self.root["data"][key]

    def read(self, key: str, sl: slice | None = None) -> np.ndarray:
        """Read committed steps of ``key`` (all of them, or the slice ``sl``) into memory."""
        n = self.n_steps
        sl = sl or slice(0, n)
        stop = min(sl.stop if sl.stop is not None else n, n)
        return np.asarray(self.array(key)[sl.start or 0 : stop])

    def episode(self, index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        sl = self.episode_slices()[index]
        return {k: self.read(k, sl) for k in (keys or self.keys)}

    # ------------------------------------------------------------------ validation
    def _check_episode_ends(self) -> None:
        ends = self.episode_ends
        if ends.size and (ends[0] <= 0 or np.any(np.diff(ends) <= 0)):
            bad = int(np.argmax(np.diff(np.concatenate([[0], ends])) <= 0))
            raise DatasetError(
                f"{self.path}: meta/episode_ends must be strictly increasing and positive "
                f"(entry {bad} is {int(ends[bad])})"
            )

    def validate(self, required_keys: Iterable[str] = ()) -> None:
        """Check the contract: non-empty, keys present, equal lengths, finite actions/states."""
        self._check_episode_ends()
        if self.n_episodes == 0:
            raise DatasetError(f"{self.path}: dataset is empty (no committed episodes)")
        for key in required_keys:
            self.array(key)
        n = self.n_steps
        for key in self.keys:
            length = self.array(key).shape[0]
            if length < n:
                raise DatasetError(
                    f"{self.path}: data/{key} has {length} steps but meta/episode_ends says {n} "
                    "(arrays of different lengths)"
                )
        for key in self.keys:
            if key in FLOAT_KEYS_CHECKED or (not is_image_key(key) and np.issubdtype(self.array(key).dtype, np.floating)):
                if key == "timestamp":
                    continue
                values = self.read(key)
                if not np.all(np.isfinite(values)):
                    step = int(np.argwhere(~np.isfinite(values.reshape(len(values), -1)))[0, 0])
                    raise DatasetError(f"{self.path}: data/{key} has a non-finite value at step {step}")

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if self.mode == "r":
            raise DatasetError(f"{self.path}: opened read-only")

    def recover(self) -> int:
        """Truncate every array to ``episode_ends[-1]``; returns how many leftover steps were cut."""
        self._require_writable()
        n = self.n_steps
        cut = 0
        for key in self.keys:
            arr = self.root["data"][key]
            if arr.shape[0] > n:
                cut = max(cut, arr.shape[0] - n)
                arr.resize((n,) + arr.shape[1:])
        self._pending = 0
        return cut

    def _ensure_array(self, key: str, sample: np.ndarray) -> zarr.Array:
        data = self.root["data"]
        if key in data:
            arr = data[key]
            if arr.shape[1:] != sample.shape[1:]:
                raise DatasetError(
                    f"{self.path}: data/{key} expects steps of shape {tuple(arr.shape[1:])}, got {tuple(sample.shape[1:])}"
                )
            return arr
        if self.n_steps > 0:
            raise DatasetError(f"{self.path}: new key {key} cannot be added to a dataset with committed episodes")
        image = is_image_key(key)
        chunks = (1,) + sample.shape[1:] if image else (_LOWDIM_CHUNK,) + sample.shape[1:]
        return data.create_array(
            key, shape=(0,) + sample.shape[1:], dtype=sample.dtype, chunks=chunks, compressors=_compressor(image)
        )

    def append_steps(self, steps: Mapping[str, np.ndarray]) -> None:
        """Write steps of the open (uncommitted) episode; every key must get the same number of steps."""
        self._require_writable()
        arrays = {k: np.asarray(v) for k, v in steps.items()}
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise DatasetError(f"{self.path}: arrays of different lengths in one append: {lengths}")
        if self.n_steps > 0:
            missing = set(self.keys) - set(arrays)
            if missing:
                raise DatasetError(f"{self.path}: append is missing keys {sorted(missing)}")
        elif self._pending > 0:  # first episode: its earlier appends fix the keys (else arrays misalign)
            data = self.root["data"]
            written = {k for k in data.array_keys() if data[k].shape[0] >= self._pending}
            if set(arrays) != written:
                raise DatasetError(
                    f"{self.path}: an append must write the same keys as the episode's earlier steps "
                    f"(missing {sorted(written - set(arrays))}, new {sorted(set(arrays) - written)})"
                )
        count = next(iter(lengths.values()))
        start = self.n_steps + self._pending
        targets = {key: self._ensure_array(key, values) for key, values in arrays.items()}  # check all, then write
        for key, values in arrays.items():
            arr = targets[key]
            if values.dtype != arr.dtype:
                values = values.astype(arr.dtype)
            arr.resize((start + count,) + arr.shape[1:])
            if not write_whole_frame_chunks(arr, start, values):
                arr[start : start + count] = values
        self._pending += count

    @property
    def pending_steps(self) -> int:
        return self._pending

    def commit_episode(self) -> int:
        """Make the written steps one visible episode (the commit point). Returns its index."""
        self._require_writable()
        if self._pending == 0:
            raise DatasetError(f"{self.path}: cannot commit an empty episode")
        ends = self.root["meta/episode_ends"]
        ends.append(np.array([self.n_steps + self._pending], dtype=np.int64))
        self._pending = 0
        return self.n_episodes - 1

    def discard_episode(self) -> int:
        """Drop the uncommitted steps; returns how many were dropped."""
        dropped = self._pending
        self.recover()
        return dropped

    def add_episode(self, episode: Mapping[str, np.ndarray]) -> int:
        """Append and commit a whole episode in one call."""
        self.append_steps(episode)
        return self.commit_episode()
