"""Fixed-clock sampling of asynchronous streams, and the crash-safe episode writer. No ROS here.

Why one ROS-free implementation: the recorder node (live DDS) and ``bag2zarr`` (offline bags) feed it the
same decoded messages with the same stamps, so a bag and a live recording of the same teleoperation give
the same dataset.

Sampling rule (DESIGN.md section 5, recorder): ticks lie on an absolute grid, ``k * period`` nanoseconds
of ROS time (period = 1/control_hz), so two callers that start an episode at slightly different moments
still sample at the same instants. At tick ``t`` each stream contributes its latest message with stamp
``<= t``, if that message is at most ``max_age`` old; otherwise the tick is dropped (not written) and
counted against every stale stream.

When a tick is decided (the watermark rule): as soon as every stream has delivered a message stamped
after ``t`` - messages of one stream arrive in stamp order, so nothing stamped ``<= t`` can still come -
or, for a stream that has gone quiet, once the clock reaches ``t + max_wait``. The result therefore does
not depend on transport latency or on when the caller's timer fires: live DDS and a bag replay give the
same samples.

Values may be :class:`Lazy`: an image is decoded and resized only if a tick selects it, and a message
that fails to decode then counts as bad and the previous message of that stream is used instead.
"""

from __future__ import annotations

import bisect
import math
import os
import queue
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from vqbet_core.data.store import ZarrDataset
from vqbet_core.errors import DatasetError, VqbetError
from vqbet_core.recording.messages import MessageError

NS = 1_000_000_000
#: per-episode lists in ``.zattrs``, one entry per committed episode
EPISODE_LISTS = ("episode_tasks", "episode_sources", "episode_notes")
_MAX_BACKLOG_TICKS = 1_000_000


class DiskFullError(VqbetError):
    """Not enough free disk to start or continue an episode."""


class Lazy:
    """A value computed on first use and cached (decode + crop/resize of a selected frame).

    :meth:`prefetch` starts the computation on a thread pool (OpenCV releases the GIL), so the recorder
    decodes frames off its callback thread; :meth:`get` then waits for it.
    """

    __slots__ = ("_fn", "_value", "_future")

    def __init__(self, fn: Callable[[], object]):
        self._fn = fn
        self._value = None
        self._future = None

    def prefetch(self, submit: Callable) -> None:
        if self._fn is not None and self._future is None:
            self._future = submit(self._fn)

    def get(self):
        if self._fn is not None:
            try:
                self._value = self._future.result() if self._future is not None else self._fn()
            finally:
                self._fn = self._future = None
        return self._value


@dataclass
class SamplerStats:
    """Counts for the current episode (reset at :meth:`StreamSampler.start`) and in total."""

    samples: int = 0  # ticks written
    dropped: int = 0  # ticks not written because some stream was stale
    stale: dict = field(default_factory=dict)  # stream -> ticks where it was stale or missing
    bad: dict = field(default_factory=dict)  # stream -> bad messages skipped (this episode)
    bad_total: dict = field(default_factory=dict)  # stream -> bad messages since creation
    late: dict = field(default_factory=dict)  # stream -> messages that came after their tick was decided
    last_bad: str = ""  # the latest bad-message reason, for logs and diagnostics

    def as_dict(self) -> dict:
        return {"samples": self.samples, "dropped": self.dropped, "stale": dict(self.stale), "late": dict(self.late),
                "bad": dict(self.bad), "bad_total": dict(self.bad_total), "last_bad": self.last_bad}


class StreamSampler:
    """Latest-message-per-stream sampling on a fixed clock (see module docstring)."""

    def __init__(self, streams: Iterable[str], control_hz: float, max_age: float, max_wait: float = 0.5,
                 max_history: int = 4096):
        self.streams = list(streams)
        if not self.streams:
            raise VqbetError("sampler needs at least one stream")
        if not (control_hz > 0 and math.isfinite(control_hz)):
            raise VqbetError(f"control_hz must be a positive number, got {control_hz}")
        if not max_age > 0:
            raise VqbetError(f"max_age must be positive seconds, got {max_age}")
        if not max_wait >= 0:
            raise VqbetError(f"max_wait must be >= 0 seconds, got {max_wait}")
        self.period_ns = int(round(NS / control_hz))
        self.max_age_ns = int(round(max_age * NS))
        self.max_wait_ns = int(round(max_wait * NS))
        self.max_history = int(max_history)
        self._stamps: dict[str, list[int]] = {s: [] for s in self.streams}
        self._values: dict[str, list] = {s: [] for s in self.streams}
        self._latest: dict[str, int] = {s: -(1 << 62) for s in self.streams}  # per-stream watermark
        self.active = False
        self.next_tick = 0
        self.end: int | None = None
        self.prefetch: Callable | None = None  # e.g. ThreadPoolExecutor.submit: decode selected frames ahead
        self.stats = SamplerStats(stale={s: 0 for s in self.streams}, bad={s: 0 for s in self.streams},
                                  bad_total={s: 0 for s in self.streams})

    # ------------------------------------------------------------------ input
    def push(self, stream: str, stamp: int, value) -> None:
        """Add a decoded (or :class:`Lazy`) message of ``stream`` stamped ``stamp`` ns."""
        stamps, values = self._stamps[stream], self._values[stream]
        if self.active and stamp < self.next_tick - self.period_ns:  # more than max_wait late: a tick missed it
            self.stats.late[stream] = self.stats.late.get(stream, 0) + 1
        if not stamps or stamp >= stamps[-1]:
            stamps.append(stamp)
            values.append(value)
        else:
            i = bisect.bisect_right(stamps, stamp)
            stamps.insert(i, stamp)
            values.insert(i, value)
        if stamp > self._latest[stream]:
            self._latest[stream] = stamp
        if len(stamps) > self.max_history:
            del stamps[0], values[0]
        if self.prefetch is not None and self.active and len(stamps) > 1:
            self._prefetch_previous(stamps, values)

    def _prefetch_previous(self, stamps: list, values: list) -> None:
        """The message before the newest is selected iff a tick falls in [its stamp, the newest's stamp)."""
        prev = values[-2]
        if not isinstance(prev, Lazy):
            return
        tick = max(self.first_tick(stamps[-2]), self.next_tick)
        if tick < stamps[-1] and (self.end is None or tick <= self.end):
            prev.prefetch(self.prefetch)

    def bad(self, stream: str, reason: str, stamp: int | None = None) -> None:
        """Count a malformed message of ``stream`` (skipped, never fatal); its stamp still moves the watermark."""
        self.stats.bad[stream] = self.stats.bad.get(stream, 0) + 1
        self.stats.bad_total[stream] = self.stats.bad_total.get(stream, 0) + 1
        self.stats.last_bad = f"{stream}: {reason}"
        if stamp is not None and stream in self._latest and stamp > self._latest[stream]:
            self._latest[stream] = stamp

    # ------------------------------------------------------------------ episodes
    def first_tick(self, at: int) -> int:
        return -(-int(at) // self.period_ns) * self.period_ns

    def start(self, at: int, end: int | None = None) -> None:
        """Sample from the first grid tick at or after ``at`` ns (up to ``end`` ns when given); resets the
        per-episode counts."""
        self.active = True
        self.next_tick = self.first_tick(at)
        self.end = None if end is None else int(end)
        self.stats.samples = self.stats.dropped = 0
        self.stats.stale = {s: 0 for s in self.streams}
        self.stats.bad = {s: 0 for s in self.streams}
        self.stats.late = {}

    def set_end(self, end: int) -> None:
        """The episode ends at ``end`` ns: ticks after it are not taken."""
        self.end = int(end)

    @property
    def done(self) -> bool:
        """Every tick up to the episode's end has been decided."""
        return self.end is not None and self.next_tick > self.end

    def stop(self) -> None:
        self.active = False
        self.end = None

    # ------------------------------------------------------------------ clock
    def _decidable(self, tick: int, now: int) -> bool:
        if now - tick >= self.max_wait_ns:
            return True
        latest = self._latest
        return all(latest[s] > tick for s in self.streams)

    def advance(self, now: int) -> list[tuple[int, dict]]:
        """Decide every tick that can be decided at clock time ``now`` (see the watermark rule);
        returns ``[(t, {stream: value})]`` of the fresh ones."""
        now = int(now)
        out = []
        if self.active:
            last = now - self.max_wait_ns if self.end is None else min(now - self.max_wait_ns, self.end)
            backlog = (last - self.next_tick) // self.period_ns + 1
            if backlog > _MAX_BACKLOG_TICKS:  # a clock jump: count, do not loop for hours
                skip = backlog - _MAX_BACKLOG_TICKS
                self.stats.dropped += skip
                for s in self.streams:
                    self.stats.stale[s] += skip
                self.next_tick += skip * self.period_ns
            while (self.end is None or self.next_tick <= self.end) and self._decidable(self.next_tick, now):
                values = self._sample(self.next_tick)
                if values is not None:
                    out.append((self.next_tick, values))
                    self.stats.samples += 1
                self.next_tick += self.period_ns
        self._prune(self.next_tick if self.active else now - self.max_wait_ns)
        return out

    def finish(self) -> list[tuple[int, dict]]:
        """Decide the remaining ticks up to the episode end with the messages there are (no more will come)."""
        if not self.active or self.end is None:
            return []
        return self.advance(self.end + self.max_wait_ns)

    def _select(self, stream: str, tick: int):
        """Latest good message of ``stream`` at ``tick``, or None when stale / missing."""
        stamps, values = self._stamps[stream], self._values[stream]
        i = bisect.bisect_right(stamps, tick) - 1
        while i >= 0:
            if tick - stamps[i] > self.max_age_ns:
                return None
            value = values[i]
            if isinstance(value, Lazy):
                try:
                    value = value.get()
                except MessageError as exc:
                    self.bad(stream, str(exc))
                    del stamps[i], values[i]
                    i -= 1
                    continue
            return value
        return None

    def _sample(self, tick: int) -> dict | None:
        # cheap staleness check on stamps first, so nothing is decoded for a tick that is dropped anyway
        stale = []
        for s in self.streams:
            stamps = self._stamps[s]
            i = bisect.bisect_right(stamps, tick) - 1
            if i < 0 or tick - stamps[i] > self.max_age_ns:
                stale.append(s)
        values = {}
        if not stale:
            for s in self.streams:
                v = self._select(s, tick)
                if v is None:
                    stale.append(s)
                    break
                values[s] = v
        if stale:
            self.stats.dropped += 1
            for s in stale:
                self.stats.stale[s] += 1
            return None
        return values

    def _prune(self, tick: int) -> None:
        """Forget messages older than ``max_age`` at ``tick``: no tick from ``tick`` on can select them.

        The cut depends on the tick only, never on when messages arrived, so live and bag replay keep the
        same candidates (a frame that fails to decode falls back to the same previous one)."""
        cut = tick - self.max_age_ns
        for s in self.streams:
            stamps = self._stamps[s]
            i = bisect.bisect_left(stamps, cut)
            if i > 0:
                del stamps[:i], self._values[s][:i]


# ====================================================================== writer
def disk_free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


@dataclass
class EpisodeResult:
    index: int  # episode index in the dataset, -1 when nothing was committed
    length: int  # steps committed (or dropped, for a discard)
    note: str = ""


class EpisodeWriter:
    """Streams sampled steps into a :class:`ZarrDataset`, one episode at a time.

    Crash safety is the store's contract (``vqbet_core.data.store``): steps go to disk as they come (in
    batches of ``flush_every``, on a background thread so the sampling clock never waits for the disk),
    past the arrays' visible length, and the episode becomes visible only at :meth:`commit`, whose
    per-episode task / source / note lists in ``.zattrs`` switch in the same atomic step. A kill at any
    moment leaves a store every reader accepts; the next open deletes the invisible leftovers.
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping, *, min_free_mb: float = 1024.0,
                 stop_free_mb: float = 256.0, flush_every: int = 30, background: bool = True,
                 check_keys: Iterable[str] = ("joint_names", "control_hz", "cameras")):
        self.path = Path(path)
        # long-horizon recordings (DESIGN.md section 9): attrs task_names -> a per-step data/task_index, from
        # the "subtask done" marks (mark()), written into the open episode just before it is committed
        self.task_names: list[str] = [str(n) for n in (attrs.get("task_names") or [])]
        self._stamps: list[int] = []
        self._marks: list[tuple[int, str]] = []
        self.min_free = int(min_free_mb * 1024 * 1024)
        self.stop_free = int(stop_free_mb * 1024 * 1024)
        self.flush_every = max(1, int(flush_every))
        self.ds, self.recovered_steps = self._open(dict(attrs), tuple(check_keys))
        self._fix_episode_lists()
        self.recording = False
        self._meta: dict = {}
        self._buffer: list[tuple[int, dict]] = []
        self._buffered_keys: dict | None = None
        self._written = 0  # steps of the open episode handed to the store (or its queue)
        self.last_stamp = 0  # stamp (ns) of the latest step added
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=64)
            self._thread = threading.Thread(target=self._worker, name="episode-writer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ opening
    def _open(self, attrs: dict, check_keys: tuple) -> tuple[ZarrDataset, int]:
        if not self.path.exists():
            # build the empty store beside the target and rename it into place: a crash never leaves a
            # half-created store behind at ``path``
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.creating")
            ZarrDataset.create(tmp, {**attrs, **{k: [] for k in EPISODE_LISTS}})
            try:
                os.rename(tmp, self.path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not self.path.exists():
                    raise
            return ZarrDataset.open(self.path, mode="a"), 0
        ds = ZarrDataset.open(self.path, mode="a")
        existing = ds.attrs
        for key in check_keys:
            if key in attrs and key in existing and _normalize(existing[key]) != _normalize(attrs[key]):
                raise DatasetError(f"{self.path}: existing dataset has {key}={existing[key]!r}, this recording "
                                   f"has {attrs[key]!r} (use a new output path)")
        return ds, ds.recovered_steps

    def _fix_episode_lists(self) -> None:
        n = self.ds.n_episodes
        attrs = self.ds.attrs
        fixed = {}
        for key in EPISODE_LISTS:
            values = list(attrs.get(key) or [])
            if len(values) != n:
                fixed[key] = (values + [""] * n)[:n]
        if fixed:
            self.ds.update_attrs(fixed)

    # ------------------------------------------------------------------ state
    @property
    def n_episodes(self) -> int:
        return self.ds.n_episodes

    @property
    def episode_length(self) -> int:
        """Steps recorded in the open episode so far."""
        return self._written + len(self._buffer)

    def disk_free(self) -> int:
        return disk_free_bytes(self.path)

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, OSError):
                raise DiskFullError(f"{self.path}: writing failed ({err.strerror or err}); recording stopped") from None
            raise err

    # ------------------------------------------------------------------ episodes
    def start(self, task: str = "", source: str = "") -> int:
        """Open a new episode; refuses when free disk is below ``min_free_mb``. Returns its future index."""
        if self.recording:
            raise VqbetError(f"episode {self.n_episodes} is already being recorded")
        free = self.disk_free()
        if free < self.min_free:
            raise DiskFullError(f"only {free / 2**20:.0f} MB free on the disk of {self.path}, need "
                                f"{self.min_free / 2**20:.0f} MB (min_free_mb) to start an episode")
        self._drain()
        self.ds.recover()
        self._error = None
        self.recording = True
        self._meta = {"episode_tasks": str(task), "episode_sources": str(source), "episode_notes": ""}
        self._written = 0
        self._buffer = []
        self._stamps, self._marks = [], []
        data = self.ds.root["data"]
        self._buffered_keys = {k: (tuple(data[k].shape[1:]), data[k].dtype) for k in self.ds.keys
                               if k != "timestamp"} or None
        return self.n_episodes

    def set_task(self, task: str) -> None:
        if self.recording:
            self._meta["episode_tasks"] = str(task)

    def add(self, stamp: int, values: Mapping[str, np.ndarray]) -> None:
        """Add one sampled step (``values`` keyed by dataset key; ``timestamp`` is added from ``stamp`` ns).

        Raises :class:`DiskFullError` when the disk has dropped below ``stop_free_mb`` or a write failed:
        the caller then commits what was written (:meth:`commit`) and stops.
        """
        if not self.recording:
            raise VqbetError("no episode is being recorded (call start first)")
        self._raise_pending_error()
        values = dict(values)
        if self.task_names:  # the real labels replace these at commit (rewrite_pending)
            values["task_index"] = np.int64(-1)
        if self._buffered_keys is None:
            self._buffered_keys = {k: (np.shape(v), np.asarray(v).dtype) for k, v in values.items()}
        elif len(values) != len(self._buffered_keys) or any(
                (np.shape(v), np.asarray(v).dtype) != self._buffered_keys.get(k) for k, v in values.items()):
            got = {k: np.shape(v) for k, v in values.items()}
            raise MessageError(f"step does not match the episode's keys/shapes: got {got}, "
                               f"expected { {k: s for k, (s, _) in self._buffered_keys.items()} }")
        self._buffer.append((int(stamp), values))
        if self.task_names:  # kept only for the subtask labels (an hour at 20 Hz would otherwise be ~3 MB)
            self._stamps.append(int(stamp))
        self.last_stamp = int(stamp)
        if len(self._buffer) >= self.flush_every:
            self._flush()
            free = self.disk_free()
            if free < self.stop_free:
                raise DiskFullError(f"disk space low: {free / 2**20:.0f} MB free on the disk of {self.path} "
                                    f"(stop_free_mb={self.stop_free / 2**20:.0f}); recording stopped")

    def mark(self, stamp: int, task: str) -> int:
        """The operator's "subtask ``task`` is done" at ``stamp`` (ns): every step of the open episode stamped
        before that time and not claimed by an earlier mark belongs to ``task``. Returns the episode's mark count."""
        if not self.recording:
            raise VqbetError("no episode is being recorded: a subtask mark needs an open episode")
        if not self.task_names:
            raise VqbetError("this recording has no task_names (set the recorder's task_names parameter)")
        if task not in self.task_names:
            raise VqbetError(f"subtask '{task}': expected one of the task names {self.task_names}")
        self._marks.append((int(stamp), str(task)))
        return len(self._marks)

    def _task_index(self, n: int) -> np.ndarray:
        from vqbet_core.data.tasks import task_index_from_marks

        stamps = np.asarray(self._stamps[:n], dtype=np.int64)
        steps = []
        for stamp, task in sorted(self._marks):
            # the last step stamped strictly before the mark: the step at the mark's time already shows the
            # subtask done (a simulator reports it with the observation after the completing action)
            last = int(np.searchsorted(stamps, stamp, side="left")) - 1
            if last >= 0:
                steps.append((last, task))
        return task_index_from_marks(n, steps, self.task_names)

    def _flush(self) -> None:
        if not self._buffer:
            return
        keys = tuple(sorted(self._buffer[0][1]))
        batch = {k: np.stack([v[k] for _, v in self._buffer]) for k in keys}
        batch["timestamp"] = np.array([t for t, _ in self._buffer], dtype=np.float64) / NS
        self._written += len(self._buffer)
        self._buffer = []
        if self._queue is not None:
            self._queue.put(batch)
        else:
            self._write(batch)

    def _write(self, batch: dict) -> None:
        if self._error is not None:
            return
        try:
            self.ds.append_steps(batch)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised on the caller's thread
            self._error = exc

    def _worker(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                self._write(batch)
            finally:
                self._queue.task_done()

    def _drain(self) -> None:
        if self._queue is not None:
            self._queue.join()

    def commit(self, note: str = "") -> EpisodeResult:
        """Make the recorded steps a visible episode (the commit point).

        After a failed write only the steps that reached the disk completely are committed, with a note.
        An empty episode is discarded instead (index -1).
        """
        if not self.recording:
            raise VqbetError("no episode is being recorded")
        failed = None
        try:
            self._flush()
        except BaseException as exc:  # noqa: BLE001
            failed = exc
        self._drain()
        if self._error is not None or failed is not None:
            err = self._error or failed
            note = note or f"truncated: {getattr(err, 'strerror', None) or err}"
        self.recording = False
        length = self.ds.pending_steps
        if length == 0:
            self.ds.recover()
            return EpisodeResult(-1, 0, note or "empty episode, nothing committed")
        if self._written != length:
            note = note or "truncated"
        if self.task_names and "task_index" in (self._buffered_keys or {}):
            self.ds.rewrite_pending("task_index", self._task_index(length))
        meta = dict(self._meta, episode_notes=note)
        attrs = self.ds.attrs
        lists = {k: list(attrs.get(k) or [])[: self.ds.n_episodes] + [meta[k]] for k in EPISODE_LISTS}
        index = self.ds.commit_episode(lists)  # the lists switch with episode_ends, in one atomic step
        return EpisodeResult(index, length, note)

    def discard(self) -> EpisodeResult:
        """Drop the open episode (nothing of it stays on disk)."""
        if not self.recording:
            raise VqbetError("no episode is being recorded")
        self._buffer = []
        self._drain()
        self.recording = False
        dropped = self._written
        self.ds.discard_episode()
        self._error = None
        return EpisodeResult(-1, dropped, "discarded")

    def close(self) -> None:
        """Stop the writer thread (an open episode stays uncommitted: commit or discard first)."""
        if self._thread is not None:
            self._drain()
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None


def _normalize(value):
    """Compare attrs read back from JSON (lists, floats) with freshly built ones (tuples, ints)."""
    if isinstance(value, Mapping):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


# ====================================================================== dataset layout
def camera_key(name: str) -> str:
    return f"camera_{name}"


def stream_keys(camera_names: Iterable[str]) -> list[str]:
    """The sampled streams, named by the dataset keys they become (DESIGN.md section 3)."""
    return [camera_key(n) for n in camera_names] + ["robot_joint", "action"]


def dataset_attrs(calibration, camera_names: Iterable[str], control_hz: float, source: str,
                  settings: Mapping | None = None) -> dict:
    """``.zattrs`` of a recorded dataset: calibration, keys, sampling settings (the same for both callers)."""
    names = list(camera_names)
    attrs = calibration.to_attrs()
    attrs["cameras"] = {n: attrs["cameras"][n] for n in names}
    if not (settings or {}).get("preprocess_images", True):
        # full frames are stored: readers must not assume the calibration's crop/resize was applied
        for n in names:
            attrs["cameras"][n] = {**attrs["cameras"][n], "preprocess": None,
                                   "calibration_preprocess": attrs["cameras"][n]["preprocess"]}
    attrs["control_hz"] = float(control_hz)
    attrs["keys"] = sorted(stream_keys(names) + ["timestamp"])
    attrs["source"] = source
    attrs["recording"] = dict(settings or {})
    if (settings or {}).get("task_names"):  # long-horizon recording: data/task_index indexes these
        attrs["task_names"] = [str(n) for n in settings["task_names"]]
        attrs["keys"] = sorted(attrs["keys"] + ["task_index"])
    return attrs


RECORDING_CHECK_KEYS = ("joint_names", "control_hz", "keys")
