"""Zarr dataset store (DESIGN.md section 3): the diffusion_policy ReplayBuffer layout, zarr format 2.

Crash safety (issue 24; user documentation in docs/reference/dataset-format.md): the folder on disk is a
valid ReplayBuffer store at every instant - every ``data/<key>`` exactly ``meta/episode_ends[-1]`` steps
long, ``episode_ends`` strictly increasing - so plain zarr, this reader and diffusion_policy's
``ReplayBuffer`` open it after a kill at any moment, with no repair step. How:

* Steps of the open episode are written as chunk data *past the visible shape* of ``data/<key>``
  (readers never look there), or, for arrays the store does not have yet (its first episode), into
  ``meta/episode_ends/.vqbet/staging/<key>``.
* The metadata that says how long things are - every ``data/<key>/.zarray``, ``meta/episode_ends/.zarray``
  and the root ``.zattrs`` (per-episode lists) - are symbolic links into one metadata *version*,
  ``meta/episode_ends/.vqbet/current -> vNNNNNNNN/``. A commit writes the new ``episode_ends`` entry into
  its chunk (past the visible shape), writes a complete new version folder, and then replaces the
  ``current`` link with one atomic rename: the commit point. Before it readers see the previous version
  whole, after it the new one whole; the per-episode lists in ``.zattrs`` switch in the same rename.
* ``.vqbet`` lies inside an array's folder, which zarr never lists as a hierarchy member.

Older stores (plain metadata files, possibly with leftovers of an interrupted episode or a trailing 0 in
``episode_ends`` from zarr's resize-then-write append) are read as they are, ignoring both; opening one
for append links it first. A copy that follows links (``cp -rL``, ``shutil.copytree``) is a plain store.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numcodecs
import numpy as np
import zarr

from vqbet_core.errors import DatasetError

SCHEMA_VERSION = 1
FLOAT_KEYS_CHECKED = ("action", "robot_joint", "state")
_LOWDIM_CHUNK = 4096
#: the store's private folder: metadata versions, the ``current`` link, staged arrays of a first episode
INTERNAL_DIR = "meta/episode_ends/.vqbet"
_ENDS_META = "meta/episode_ends/.zarray"

_write_hook: Callable[[str], None] | None = None


def set_write_hook(hook: Callable[[str], None] | None):
    """Call ``hook(label)`` after every write to a store folder (tests inject kills there); returns the old hook."""
    global _write_hook
    previous, _write_hook = _write_hook, hook
    return previous


def _written(label: str) -> None:
    if _write_hook is not None:
        _write_hook(label)


def _compressor(is_image: bool):
    if is_image:
        return numcodecs.Blosc(cname="lz4", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)


def is_image_key(key: str) -> bool:
    return key.startswith("camera_")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_filesystem(path: Path) -> None:
    """Flush the episode's chunk files to disk before the commit point (one ``syncfs`` on Linux, ``sync``
    elsewhere): after a power cut a committed episode has its data, not zeros."""
    try:
        import ctypes

        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_link(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` in one rename (a reader sees the old or the new link, never none)."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.link")
    try:
        os.symlink(target, tmp)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise DatasetError(f"{link.parent}: this file system has no symbolic links, which the crash-safe store "
                               "needs (write the dataset to a Linux file system such as ext4; copy it elsewhere "
                               "afterwards with cp -rL)") from None
        raise
    os.replace(tmp, link)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _json_bytes(obj) -> bytes:
    def default(o):
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        return str(o)

    return json.dumps(obj, indent=2, default=default).encode()


def _committed_ends(values: np.ndarray) -> np.ndarray:
    """``episode_ends`` without a trailing entry that is not past the one before it.

    Stores written before the versioned layout could be killed between zarr's resize of episode_ends and
    the write of its chunk, leaving a trailing fill value (0): that episode was never committed."""
    n = len(values)
    while n and values[n - 1] <= (values[n - 2] if n > 1 else 0):
        n -= 1
    return values[:n]


def _array_keys(group) -> list[str]:
    with warnings.catch_warnings():  # zarr 3 warns about folders that are not (yet) arrays; they are not ours
        warnings.simplefilter("ignore")
        return sorted(group.array_keys())


def write_whole_frame_chunks(arr: zarr.Array, start: int, values: np.ndarray) -> bool:
    """Write ``values`` (one step per chunk) to ``arr[start:]`` as chunk files; False if not applicable.

    Why: image arrays have one frame per chunk (the contract, so readers can fetch single frames), and
    zarr-python 3 spends ~0.6 ms of asyncio bookkeeping on each chunk it writes - most of ``bag2zarr``'s
    time. For the case this store creates (format 2 on a local directory, no filters, C order, chunk =
    one whole step) the chunk file is just the array's own compressor applied to the frame's bytes, at
    the key ``"{step}.0.0..."``; this writes exactly that (tests compare it byte for byte with zarr's
    own write). Anything else returns False and goes through zarr. The frames written here always lie
    past the array's visible shape (the open episode), so a partly written file is never read.
    """
    meta = arr.metadata
    store_path = arr.store_path
    root = getattr(store_path.store, "root", None)
    if (getattr(meta, "zarr_format", None) != 2 or root is None or meta.filters or meta.order != "C"
            or meta.compressor is None or tuple(meta.chunks) != (1,) + tuple(arr.shape[1:])
            or values.dtype != arr.dtype or not getattr(store_path.store, "supports_writes", False)):
        return False
    folder = Path(root) / store_path.path
    folder.mkdir(parents=True, exist_ok=True)
    suffix = (meta.dimension_separator or ".").join([""] + ["0"] * (values.ndim - 1))
    encode = meta.compressor.encode
    for i, frame in enumerate(values):
        with open(folder / f"{start + i}{suffix}", "wb") as f:
            f.write(encode(np.ascontiguousarray(frame)))
        _written(f"frame {store_path.path}/{start + i}")
    return True


class ZarrDataset:
    """A dataset store: ``data/<key>`` arrays plus ``meta/episode_ends``.

    Open with :meth:`create` (new store), :meth:`open` (read or append). ``mode='r'`` never writes and
    sees committed episodes only. ``mode='a'`` keeps the committed metadata in memory and publishes each
    change (commit, attrs) as a new metadata version (module docstring).
    """

    def __init__(self, root: zarr.Group, path: Path, mode: str):
        self.root = root
        self.path = Path(path)
        self.mode = mode
        self._pending = 0  # steps of the open episode written past the visible shapes (not committed yet)
        self.recovered_steps = 0  # steps of an interrupted episode found (and deleted) by open(mode='a')
        self._ends: np.ndarray | None = None  # committed episode_ends (read lazily in mode 'r')
        # writer state (mode 'a'): the committed metadata, published as whole versions
        self._arrays: dict[str, dict] = {}  # key -> .zarray JSON of committed arrays
        self._staged: dict[str, dict] = {}  # key -> .zarray JSON of arrays the open (first) episode creates
        self._ends_meta: dict = {}
        self._attrs: dict = {}

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
        return cls.open(path, mode="a")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "ZarrDataset":
        """Open an existing store; ``mode='a'`` (append) takes it over for writing (see :meth:`_take_over`)."""
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
        ds._check_episode_ends()
        if mode != "r":
            ds._take_over()
        return ds

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
        if self._ends is None:
            self._ends = _committed_ends(np.asarray(self.root["meta/episode_ends"][:], dtype=np.int64))
        return self._ends.copy()

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        ends = self.episode_ends
        return int(ends[-1]) if len(ends) else 0

    @property
    def keys(self) -> list[str]:
        if self.mode != "r":
            return sorted(self._arrays)
        return _array_keys(self.root["data"])

    @property
    def attrs(self) -> dict:
        if self.mode != "r":
            return json.loads(_json_bytes(self._attrs))
        return dict(self.root.attrs)

    def update_attrs(self, attrs: Mapping) -> None:
        """Change ``.zattrs`` (one atomic metadata version)."""
        self._require_writable()
        new = {**self._attrs, **json.loads(_json_bytes(dict(attrs)))}
        self._publish(self._arrays, self._ends_meta, new)
        self._attrs = new

    def episode_slices(self) -> list[slice]:
        ends = self.episode_ends
        starts = np.concatenate([[0], ends[:-1]])
        return [slice(int(s), int(e)) for s, e in zip(starts, ends)]

    def array(self, key: str):
        """The committed part of ``data/<key>`` as a lazy zarr array slice source."""
        if key not in self.keys:
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

    # ------------------------------------------------------------------ metadata versions
    @property
    def _internal(self) -> Path:
        return self.path / INTERNAL_DIR

    def _link_target(self, rel: str) -> str:
        """The relative link from ``rel`` (a metadata file) to its copy in the current version."""
        name = rel.replace("/", "~")
        return os.path.relpath(self._internal / "current" / name, (self.path / rel).parent)

    def _versions(self) -> list[int]:
        if not self._internal.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in self._internal.iterdir()
                      if p.name.startswith("v") and p.name[1:].isdigit() and p.is_dir() and not p.is_symlink())

    def _current_version(self) -> int | None:
        try:
            name = os.readlink(self._internal / "current")
        except OSError:
            return None
        return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None

    def _publish(self, arrays: Mapping[str, dict], ends_meta: dict, attrs: dict, new_keys: Iterable[str] = ()) -> None:
        """Write a complete metadata version and make it current (the atomic step), then tidy up.

        ``new_keys``: staged arrays (first episode) moved into ``data/`` just before the switch; their
        ``.zarray`` links point at the current version, which has no such file until the switch."""
        internal = self._internal
        internal.mkdir(parents=True, exist_ok=True)
        previous = self._current_version()
        number = max(self._versions() + [previous or 0]) + 1
        vdir = internal / f"v{number:08d}"
        vdir.mkdir()
        files = {".zattrs": _json_bytes(attrs), _ENDS_META: _json_bytes(ends_meta)}
        files.update({f"data/{k}/.zarray": _json_bytes(m) for k, m in sorted(arrays.items())})
        for rel, data in files.items():
            _write_synced(vdir / rel.replace("/", "~"), data)
            _written(f"version {vdir.name} {rel}")
        _fsync_dir(vdir)
        for key in new_keys:
            staged = internal / "staging" / key
            staged.mkdir(parents=True, exist_ok=True)
            _replace_link(self._link_target(f"data/{key}/.zarray"), staged / ".zarray")
            _written(f"link staged {key}")
            target = self.path / "data" / key
            if target.exists() or target.is_symlink():  # a leftover of a kill right after such a move
                _remove(target)
            os.rename(staged, target)
            _written(f"move staged {key} into data/")
        if new_keys:
            _fsync_dir(self.path / "data")
        _replace_link(vdir.name, internal / "current")  # the commit point
        _fsync_dir(internal)
        _written(f"switch current -> {vdir.name}")
        for rel in files:  # stores written before this layout, or a file another writer replaced: link it
            link = self.path / rel
            target = self._link_target(rel)
            if not (link.is_symlink() and os.readlink(link) == target):
                _replace_link(target, link)
                _written(f"link {rel}")
        for old in self._versions():  # keep the previous version: a reader may have resolved it just now
            if old not in (number, previous):
                shutil.rmtree(internal / f"v{old:08d}", ignore_errors=True)
                _written(f"remove version v{old:08d}")
        self.root = zarr.open_group(str(self.path), mode="r+", zarr_format=2)

    def _read_json(self, rel: str) -> dict:
        try:
            return json.loads((self.path / rel).read_bytes())
        except FileNotFoundError:
            return {}

    def _take_over(self) -> None:
        """Open for append: load the committed metadata and make the store follow the versioned layout.

        A store of this layout needs nothing (leftovers of an interrupted episode are invisible and are
        only deleted). An older store is linked; its own leftovers (arrays longer than episode_ends[-1],
        a trailing 0 in episode_ends, empty arrays in a store without episodes) are cut in the same
        metadata version, so it is a valid ReplayBuffer store from then on."""
        ends = self.episode_ends
        n = int(ends[-1]) if len(ends) else 0
        data_dir = self.path / "data"
        keys = [p.name for p in sorted(data_dir.iterdir()) if (p / ".zarray").is_file()] if data_dir.is_dir() else []
        arrays = {k: self._read_json(f"data/{k}/.zarray") for k in keys}
        ends_meta = self._read_json(_ENDS_META)
        attrs = self._read_json(".zattrs")
        legacy_cut = 0
        current = self._internal / "current"
        if current.exists() and not current.is_symlink():  # a copy that followed links: plain files, stale folder
            if not any((self.path / rel).is_symlink() for rel in [".zattrs", _ENDS_META] + [f"data/{k}/.zarray" for k in keys]):
                _remove(self._internal)
        changed = ends_meta.get("shape", [None])[0] != len(ends)
        ends_meta["shape"] = [len(ends)]
        for k, meta in list(arrays.items()):
            if n == 0:  # arrays of a store without episodes: ReplayBuffer refuses them (episode_ends[-1])
                legacy_cut = max(legacy_cut, meta["shape"][0])
                arrays.pop(k)
                changed = True
            elif meta["shape"][0] > n:
                legacy_cut = max(legacy_cut, meta["shape"][0] - n)
                meta["shape"] = [n] + list(meta["shape"][1:])
                changed = True
        linked = all((self.path / rel).is_symlink() and os.readlink(self.path / rel) == self._link_target(rel)
                     for rel in [".zattrs", _ENDS_META] + [f"data/{k}/.zarray" for k in arrays])
        if changed or not linked or self._current_version() is None:
            self._publish(arrays, ends_meta, attrs)
            for k in keys:
                if k not in arrays:
                    trash = self._internal / "trash" / k
                    trash.parent.mkdir(parents=True, exist_ok=True)
                    _remove(trash)
                    os.rename(data_dir / k, trash)
                    _written(f"remove empty array {k}")
        self._arrays, self._ends_meta, self._attrs = arrays, ends_meta, attrs
        self._ends = ends
        self.recovered_steps = max(legacy_cut, self._collect_garbage())

    def _collect_garbage(self) -> int:
        """Delete what no reader sees: chunk files past the committed length, staged arrays, folders in
        ``data/`` without metadata, unused versions and temporary files. Returns the number of steps of
        an interrupted episode found (exact for one-step chunks, e.g. camera frames)."""
        n = self.n_steps
        found = 0
        for key, meta in self._arrays.items():
            folder = self.path / "data" / key
            rows = int(meta["chunks"][0])
            first_free = -(-n // rows)
            for p in folder.iterdir():
                name = p.name
                if name.endswith((".partial", ".tmp", ".link")):
                    _remove(p)
                    continue
                head = name.split(".")[0]
                if head.isdigit() and int(head) >= first_free:
                    if rows == 1:
                        found = max(found, int(head) + 1 - n)
                    _remove(p)
        internal = self._internal
        for folder in [internal / "staging", internal / "trash"]:
            if folder.is_dir():
                for p in folder.iterdir():
                    if folder.name == "staging":
                        heads = [q.name.split(".")[0] for q in p.iterdir()] if p.is_dir() else []
                        found = max([found] + [int(h) + 1 for h in heads if h.isdigit()])
                    _remove(p)
        data_dir = self.path / "data"
        for p in data_dir.iterdir():
            if p.is_dir() and p.name not in self._arrays and not (p / ".zarray").is_file() and not (p / ".zgroup").exists():
                heads = [q.name.split(".")[0] for q in p.iterdir()]
                found = max([found] + [int(h) + 1 for h in heads if h.isdigit()])
                _remove(p)  # a staged array moved in by a commit killed before its switch
        current = self._current_version()
        if internal.is_dir():
            for p in internal.iterdir():
                if p.name.endswith((".tmp", ".link")):
                    _remove(p)
            for v in self._versions():
                if current is not None and (v > current or v < current - 1):
                    shutil.rmtree(internal / f"v{v:08d}", ignore_errors=True)
        return found

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if self.mode == "r":
            raise DatasetError(f"{self.path}: opened read-only")

    def recover(self) -> int:
        """Drop the open episode's steps and delete leftovers no reader sees; returns the steps found."""
        self._require_writable()
        self._pending = 0
        self._staged = {}
        return self._collect_garbage()

    def _view(self, rel: str, meta: dict, rows: int) -> zarr.Array:
        """``rel`` as an array ``rows`` long, without writing its metadata: writes past the visible shape."""
        from zarr.core.array import AsyncArray
        from zarr.core.metadata.v2 import ArrayV2Metadata
        from zarr.storage import StorePath

        m = ArrayV2Metadata.from_dict({**meta, "shape": [rows] + list(meta["shape"][1:])})
        return zarr.Array(AsyncArray(m, StorePath(self.root.store_path.store, rel)))

    def _new_array_meta(self, key: str, sample: np.ndarray) -> dict:
        from zarr.core.buffer import default_buffer_prototype

        image = is_image_key(key)
        chunks = (1,) + sample.shape[1:] if image else (_LOWDIM_CHUNK,) + sample.shape[1:]
        mem = zarr.create_array(zarr.storage.MemoryStore(), shape=(0,) + sample.shape[1:], dtype=sample.dtype,
                                chunks=chunks, compressors=_compressor(image), zarr_format=2)
        return json.loads(mem.metadata.to_buffer_dict(default_buffer_prototype())[".zarray"].to_bytes())

    def _target(self, key: str, sample: np.ndarray) -> tuple[str, dict]:
        if key in self._arrays or key in self._staged:
            meta = self._arrays.get(key) or self._staged[key]
            if tuple(meta["shape"][1:]) != sample.shape[1:]:
                raise DatasetError(
                    f"{self.path}: data/{key} expects steps of shape {tuple(meta['shape'][1:])}, got {tuple(sample.shape[1:])}"
                )
            return (f"data/{key}" if key in self._arrays else f"{INTERNAL_DIR}/staging/{key}"), meta
        if self.n_steps > 0:
            raise DatasetError(f"{self.path}: new key {key} cannot be added to a dataset with committed episodes")
        return f"{INTERNAL_DIR}/staging/{key}", self._new_array_meta(key, sample)

    def append_steps(self, steps: Mapping[str, np.ndarray]) -> None:
        """Write steps of the open (uncommitted) episode; every key must get the same number of steps."""
        self._require_writable()
        arrays = {k: np.asarray(v) for k, v in steps.items()}
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise DatasetError(f"{self.path}: arrays of different lengths in one append: {lengths}")
        if self.n_steps > 0:
            missing = set(self._arrays) - set(arrays)
            if missing:
                raise DatasetError(f"{self.path}: append is missing keys {sorted(missing)}")
        elif self._pending > 0:  # first episode: its earlier appends fix the keys (else arrays misalign)
            written = set(self._staged)
            if set(arrays) != written:
                raise DatasetError(
                    f"{self.path}: an append must write the same keys as the episode's earlier steps "
                    f"(missing {sorted(written - set(arrays))}, new {sorted(set(arrays) - written)})"
                )
        count = next(iter(lengths.values()))
        start = self.n_steps + self._pending
        targets = {key: self._target(key, values) for key, values in arrays.items()}  # check all, then write
        for key, values in arrays.items():
            rel, meta = targets[key]
            if key not in self._arrays and key not in self._staged:
                staged = self.path / rel
                _remove(staged)  # a leftover of an interrupted first episode
                staged.mkdir(parents=True)
                self._staged[key] = meta
            arr = self._view(rel, meta, start + count)
            if values.dtype != arr.dtype:
                values = values.astype(arr.dtype)
            if not write_whole_frame_chunks(arr, start, values):
                arr[start : start + count] = values
                _written(f"chunks {rel}")
        self._pending += count

    @property
    def pending_steps(self) -> int:
        return self._pending

    def rewrite_pending(self, key: str, values: np.ndarray) -> None:
        """Overwrite ``key`` for every step of the open episode (still invisible, so readers never see the old
        values): for per-step labels known only at the episode's end, such as ``task_index`` from the
        operator's "subtask done" marks (DESIGN.md section 9)."""
        self._require_writable()
        values = np.asarray(values)
        if len(values) != self._pending:
            raise DatasetError(f"{self.path}: rewrite of data/{key} with {len(values)} steps, the open episode has {self._pending}")
        if key not in self._arrays and key not in self._staged:
            raise DatasetError(f"{self.path}: data/{key} has no steps in the open episode to rewrite")
        rel, meta = self._target(key, values)
        arr = self._view(rel, meta, self.n_steps + self._pending)
        arr[self.n_steps : self.n_steps + self._pending] = values.astype(arr.dtype)
        _written(f"chunks {rel}")

    def commit_episode(self, attrs: Mapping | None = None) -> int:
        """Make the written steps one visible episode (the commit point), with ``attrs`` changed in the same
        atomic step (e.g. per-episode lists). Returns the episode's index.

        Order: the new ``episode_ends`` entry goes into its chunk past the visible shape, then a new
        metadata version (all shapes, attrs) is written and switched to in one rename. The episode's data
        is flushed to disk first, so the switch never points at data still in the page cache."""
        self._require_writable()
        if self._pending == 0:
            raise DatasetError(f"{self.path}: cannot commit an empty episode")
        ends = self.episode_ends
        end = self.n_steps + self._pending
        index = len(ends)
        _sync_filesystem(self.path)
        self._view("meta/episode_ends", self._ends_meta, index + 1)[index] = end
        _written("episode_ends chunk")
        arrays = {k: {**m, "shape": [end] + list(m["shape"][1:])} for k, m in {**self._arrays, **self._staged}.items()}
        ends_meta = {**self._ends_meta, "shape": [index + 1]}
        new_attrs = {**self._attrs, **json.loads(_json_bytes(dict(attrs or {})))}
        self._publish(arrays, ends_meta, new_attrs, new_keys=sorted(self._staged))
        self._arrays, self._ends_meta, self._attrs = arrays, ends_meta, new_attrs
        self._ends = np.append(ends, np.int64(end))
        self._staged = {}
        self._pending = 0
        return index

    def discard_episode(self) -> int:
        """Drop the uncommitted steps; returns how many were dropped."""
        dropped = self._pending
        self.recover()
        return dropped

    def add_episode(self, episode: Mapping[str, np.ndarray], attrs: Mapping | None = None) -> int:
        """Append and commit a whole episode in one call."""
        self.append_steps(episode)
        return self.commit_episode(attrs)
