"""ROS 2 bags (.db3 / .mcap) -> zarr dataset, with ``rosbags`` (no ROS install).

The bag is replayed through the recorder's own code (:class:`StreamSampler` + :class:`EpisodeWriter` +
``messages``): each message is pushed with the stamp the recorder would use, and the sampling clock is
the bag's log time (the receive time of ``ros2 bag record``). So the same teleoperation gives the same
dataset live and from a bag.

Episodes: one per bag (ticks from the first to the last message), or split by a marker topic of
``std_msgs/String`` messages (``--episode-topic``). A marker is ``start [task label]``, ``end`` or
``discard``, or the JSON the recorder node publishes on ``~/episode_events``
(``{"event": "start", "stamp_ns": ..., "task": ...}``): recording that topic in the bag reproduces the
recorder's episodes exactly. As live, an episode covers the ticks from its start to its end marker; a
start without an end before the bag ends is not converted (live, it was never committed either).

Subtask marks (long-horizon recordings, DESIGN.md section 9): with ``subtask_topic`` and ``task_names``
(``--subtask-topic``, ``--task-names``), the ``std_msgs/String`` "subtask done" marks on that topic - the
messages the recorder's ``~/subtask_done`` takes: a plain subtask name, stamped with its log time, or JSON
``{"task": name, "stamp": seconds}`` - give each step its ``data/task_index``, with the recorder's rule
(:meth:`EpisodeWriter.mark`: the last step stamped before a mark closes its subtask). A mark belongs to the
episode whose window (start to end) holds its stamp. Recording the recorder's ``~/subtask_done`` topic in
the bag therefore reproduces the live ``task_index``. A mark naming a subtask outside ``task_names`` stops
the bag with one line naming it.

Each episode's source (``<bag path>#<k>``) is kept in ``.zattrs`` ``episode_sources``; converting a bag
again skips the episodes already in the dataset, so a run interrupted by a corrupt bag can be repeated.

Parallel conversion (``workers`` > 1): an episode's ticks are cut into segments of ``segment_seconds``, and
worker processes replay each segment's part of the bag (from ``max_age`` + 0.25 s before its first tick to
0.25 s after its last) through the same sampler; the main process writes the segments in order. A tick only
selects messages stamped within ``max_age`` before it, so the dataset is the same as a single pass's -
provided every header stamp is within 0.25 s (and ``max_wait``) of its log time; a bag where one is not is
converted in a single pass (the workers check). Bad messages are counted once each, by topic and log time.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vqbet_core.errors import VqbetError
from vqbet_core.recording.messages import (
    JointMapper,
    MessageError,
    check_compressed,
    check_image,
    choose_stamp,
    command_kind,
    frame_for_dataset,
    check_stamp,
    parse_subtask_mark,
)
from vqbet_core.recording.sampler import (
    NS,
    RECORDING_CHECK_KEYS,
    DiskFullError,
    EpisodeWriter,
    Lazy,
    StreamSampler,
    camera_key,
    dataset_attrs,
    stream_keys,
)

IMAGE_TYPES = {"sensor_msgs/msg/Image": False, "sensor_msgs/msg/CompressedImage": True}
STRING_TYPE = "std_msgs/msg/String"
#: a segment reads this much beyond what its ticks can select, for header stamps off their log time
SKEW_NS = NS // 4


class BagError(VqbetError):
    """A bag that cannot be converted (missing topic, wrong type, corrupt or truncated file)."""


@dataclass
class BagOptions:
    """What to read and how to sample it (the recorder node's parameters, offline)."""

    joint_states_topic: str = "/joint_states"
    command_topic: str = "/teleop/joint_command"
    camera_topics: dict = field(default_factory=dict)  # camera name -> topic; default: the calibration's
    episode_topic: str | None = None
    control_hz: float | None = None  # default: the calibration's
    max_age: float = 0.1
    max_wait: float = 0.5
    stamp_source: str = "header"  # header | receive (= bag log time)
    future_tolerance: float = 0.1  # a stamp more than this ahead of its log time is a bad message (clock rule)
    preprocess: bool = True
    task: str = ""
    min_free_mb: float = 1024.0
    stop_free_mb: float = 256.0
    workers: int = 0  # processes converting segments in parallel; 0 = one per CPU, 1 = a single pass
    segment_seconds: float = 2.0  # ticks per parallel segment, in seconds of recording
    subtask_topic: str | None = None  # "subtask done" marks (std_msgs/String) -> data/task_index
    task_names: list = field(default_factory=list)  # what data/task_index indexes (needed with subtask_topic)

    def settings(self) -> dict:
        out = {"max_age": self.max_age, "max_wait": self.max_wait, "stamp_source": self.stamp_source,
               "future_tolerance": self.future_tolerance, "preprocess_images": self.preprocess}
        if self.task_names:
            out["task_names"] = list(self.task_names)
        return out


@dataclass
class BagReport:
    bag: str
    episodes: list = field(default_factory=list)  # (index, length)
    skipped: int = 0  # episodes already in the dataset
    dropped: int = 0
    stale: dict = field(default_factory=dict)
    bad: dict = field(default_factory=dict)
    error: str = ""
    bytes_read: int = 0


@dataclass
class SegmentResult:
    """What a worker sampled from one segment of an episode (see the module docstring)."""

    samples: list = field(default_factory=list)  # [(tick ns, {stream: value})], in tick order
    dropped: int = 0
    stale: dict = field(default_factory=dict)
    bad: set = field(default_factory=set)  # {(stream, topic, log ns)} of the bad messages it met
    messages: int = 0  # messages of its own span (for progress and bytes read)
    bytes_read: int = 0
    error: str = ""  # the bag is unreadable from here on (BagError text)
    skewed: bool = False  # a header stamp more than SKEW_NS from its log time: convert in one pass


def _rosbags():
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
    except ImportError:  # pragma: no cover - rosbags is a core dependency
        raise VqbetError("bag2zarr needs the 'rosbags' package (pip install rosbags)") from None
    return AnyReader, get_typestore(Stores.ROS2_JAZZY)


def _image_fallback(msg):
    """Encodings outside the built-in set (16-bit, bayer, yuv): rosbags-image, when installed."""
    from rosbags.image import message_to_cvimage

    return message_to_cvimage(msg, "rgb8")


def parse_marker(data: str, log_ns: int) -> tuple[str, int, str]:
    """An episode marker -> (event, stamp ns, task). See the module docstring for the format."""
    text = data.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
            return str(obj["event"]), int(obj.get("stamp_ns") or log_ns), str(obj.get("task") or "")
        except (ValueError, KeyError, TypeError) as exc:
            raise MessageError(f"episode marker is not valid JSON with an 'event' ({exc})") from None
    word, _, rest = text.partition(" ")
    return word.lower(), int(log_ns), rest.strip()


def episode_windows(markers: list[tuple[str, int, str]]) -> list[tuple[int, int, str]]:
    """Marker events in log order -> committed (start, end, task) windows."""
    windows, open_start, task = [], None, ""
    for event, stamp, label in markers:
        if event == "start":
            open_start, task = stamp, label
        elif event in ("end", "stop", "commit") and open_start is not None:
            windows.append((open_start, stamp, label or task))
            open_start = None
        elif event == "discard":
            open_start = None
    return windows


def camera_topics(calibration, options: BagOptions) -> dict:
    """Camera name -> topic: the calibration's, with ``--camera NAME=TOPIC`` overrides."""
    return {**{n: c.topic for n, c in calibration.cameras.items()}, **options.camera_topics}


class _BagSession:
    """One bag replayed through the sampler into the writer."""

    def __init__(self, reader, bag: Path, calibration, options: BagOptions, writer: EpisodeWriter,
                 done_sources: set, tick: Callable[[int], None]):
        self.reader, self.bag, self.cal, self.opt, self.writer = reader, bag, calibration, options, writer
        self.tick = tick
        self.report = BagReport(str(bag))
        self.done_sources = done_sources
        by_topic = {}
        for conn in reader.connections:
            by_topic.setdefault(conn.topic, []).append(conn)
        self.by_topic = by_topic
        cams = camera_topics(calibration, options)
        self.streams = {}  # topic -> (stream key, kind)
        for name, topic in cams.items():
            msgtype = self._require(topic, set(IMAGE_TYPES))
            self.streams[topic] = (camera_key(name), ("compressed" if IMAGE_TYPES[msgtype] else "image", name))
        self._require(options.joint_states_topic, {"sensor_msgs/msg/JointState"})
        self.streams[options.joint_states_topic] = ("robot_joint", ("joint_state", None))
        cmd_type = self._require(options.command_topic, {"sensor_msgs/msg/JointState", "trajectory_msgs/msg/JointTrajectory"})
        self.command_kind = command_kind(cmd_type)
        if options.command_topic == options.joint_states_topic:
            raise BagError(f"bag {bag}: the teleop command topic must differ from the joint states topic")
        self.streams[options.command_topic] = ("action", ("command", None))
        self.mapper = JointMapper(calibration.joint_names)
        self.cam_names = list(cams)
        hz = options.control_hz or calibration.control_hz
        self.sampler = StreamSampler(stream_keys(self.cam_names), hz, options.max_age, options.max_wait)
        self.preprocess = {n: calibration.cameras[n].preprocess if options.preprocess else None for n in self.cam_names}
        self.bad_ids: set | None = None  # segment mode: (stream, topic, log ns) of every bad message met
        self.skewed = False
        self.marks: list[tuple[int, str]] = []  # (stamp ns, subtask) of the "subtask done" marks, read by windows()

    def _require(self, topic: str, types: set) -> str:
        conns = self.by_topic.get(topic)
        if not conns:
            have = ", ".join(sorted(self.by_topic)) or "no topics"
            raise BagError(f"bag {self.bag}: topic {topic} not found (bag has: {have})")
        msgtype = conns[0].msgtype
        if msgtype not in types:
            raise BagError(f"bag {self.bag}: topic {topic} has type {msgtype}, expected {' or '.join(sorted(types))}")
        return msgtype

    # ------------------------------------------------------------------ episodes
    def windows(self) -> list[tuple[int, int, str, str]]:
        """(start, end, task, source id) of every episode in this bag, in order (and the subtask marks)."""
        bag_id = str(self.bag.resolve())
        if self.opt.subtask_topic:
            self.marks = self._read_marks()
        if not self.opt.episode_topic:
            start, end = self.reader.start_time, self.reader.end_time
            return [(start, end, self.opt.task, f"{bag_id}#0")]
        self._require(self.opt.episode_topic, {STRING_TYPE})
        markers = []
        for conn, log_ns, raw in self._messages(self.by_topic[self.opt.episode_topic]):
            try:
                markers.append(parse_marker(self.reader.deserialize(raw, conn.msgtype).data, log_ns))
            except Exception as exc:  # a bad marker is counted, the others still split the bag
                self._bad_marker(exc)
        return [(s, e, t or self.opt.task, f"{bag_id}#{k}") for k, (s, e, t) in enumerate(episode_windows(markers))]

    def _read_marks(self) -> list[tuple[int, str]]:
        """The "subtask done" marks of ``subtask_topic``: (stamp ns, name) by stamp; a mark with a name outside
        ``task_names`` is a BagError naming it; an unreadable mark (or one stamped in the future) is counted."""
        topic = self.opt.subtask_topic
        self._require(topic, {STRING_TYPE})
        marks, unknown = [], []
        tolerance = int(self.opt.future_tolerance * NS)
        for conn, log_ns, raw in self._messages(self.by_topic[topic]):
            try:
                name, stamp = parse_subtask_mark(self.reader.deserialize(raw, conn.msgtype).data, log_ns)
                check_stamp(stamp, log_ns, tolerance)  # the clock rule: the log time is the receive time
            except Exception as exc:  # noqa: BLE001 - a bad mark is counted; the others still label the steps
                self.sampler.bad(topic, f"bad subtask mark: {exc}")
                continue
            if name not in self.opt.task_names:
                unknown.append(name)
            marks.append((stamp, name))
        if unknown:
            raise BagError(f"bag {self.bag}: subtask marks on {topic} name {sorted(set(unknown))}, not in --task-names "
                           f"{list(self.opt.task_names)}")
        return sorted(marks)

    def _bad_marker(self, exc) -> None:
        self.sampler.bad(self.opt.episode_topic, f"bad episode marker: {exc}")

    def _messages(self, conns, start: int | None = None, stop: int | None = None):
        topic = "?"
        try:
            for conn, log_ns, raw in self.reader.messages(connections=conns, start=start, stop=stop):
                topic = conn.topic
                yield conn, log_ns, raw
        except VqbetError:
            raise
        except Exception as exc:  # sqlite3 / mcap / rosbags errors: one line naming bag and topic
            raise BagError(f"bag {self.bag}: corrupt or truncated (reading {topic} and the messages after it): "
                           f"{type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ replay
    def _convert(self, msg, kind, ident):
        what, cam = kind
        if what == "joint_state":
            return self.mapper.from_joint_state(msg)
        if what == "command":
            return self.mapper.from_command(msg, self.command_kind)
        compressed = what == "compressed"
        if compressed:  # cheap header checks: every corrupt frame is counted, selected or not (as the nodes do)
            check_compressed(msg)
        else:
            check_image(msg)
        pre = self.preprocess[cam]
        bad_ids = self.bad_ids

        def decode():
            try:
                return frame_for_dataset(msg, pre, compressed, _image_fallback)
            except MessageError:
                if bad_ids is not None:  # counted by the sampler too; the id keeps segments from counting it twice
                    bad_ids.add(ident)
                raise

        return Lazy(decode)

    def _bad(self, stream: str, reason: str, ident, stamp: int | None = None) -> None:
        self.sampler.bad(stream, reason, stamp)
        if self.bad_ids is not None:
            self.bad_ids.add(ident)

    def _push(self, conn, raw, log_ns, stream, kind) -> None:
        """One bag message into the sampler, exactly as the node's callbacks do it."""
        ident = (stream, conn.topic, log_ns)
        try:
            msg = self.reader.deserialize(raw, conn.msgtype)
        except Exception as exc:  # undeserializable bytes: a bad message, not a crash
            self._bad(stream, f"cannot deserialize {conn.msgtype}: {type(exc).__name__}: {exc}", ident)
            return
        try:  # the clock rule (vqbet_core.recording.clock): the log time is the receive time
            stamp = choose_stamp(msg, log_ns, self.opt.stamp_source, int(self.opt.future_tolerance * NS))
        except MessageError as exc:  # stamped in the future: not used, and it does not move the watermark
            self._bad(stream, str(exc), ident)
            return
        if self.bad_ids is not None and abs(stamp - log_ns) > min(SKEW_NS, self.sampler.max_wait_ns):
            self.skewed = True  # a single pass could judge this message late: the segments might not
        try:
            value = self._convert(msg, kind, ident)
        except MessageError as exc:
            self._bad(stream, str(exc), ident, stamp)
            return
        self.sampler.push(stream, stamp, value)

    def _conns(self) -> tuple[list, dict]:
        conns = [c for t in self.streams for c in self.by_topic[t]]
        return conns, {c.id: self.streams[c.topic] for c in conns}

    def sample_segment(self, lo: int, last: int, read_from: int | None, read_to: int | None,
                       own_to: int | None) -> SegmentResult:
        """A worker's job: the ticks ``lo..last`` (ns), reading the bag's log times ``[read_from, read_to)``
        (None: its start / end) and at least its own span ``[lo, own_to)``, whose messages it counts."""
        self.bad_ids, self.skewed = set(), False
        res = SegmentResult()
        conns, stream_of = self._conns()
        self.sampler.start(lo, last)
        log_ns = lo if read_from is None else read_from
        try:
            for conn, log_ns, raw in self._messages(conns, start=read_from, stop=read_to):
                if (log_ns >= lo or read_from is None) and (own_to is None or log_ns < own_to):  # its own span
                    res.messages += 1
                    res.bytes_read += len(raw)
                self._push(conn, raw, log_ns, *stream_of[conn.id])
                res.samples += self.sampler.advance(log_ns)
                if self.sampler.done and own_to is not None and log_ns >= own_to:
                    break  # its ticks are decided and its span is read (bad messages there are its to count)
            else:
                res.samples += self.sampler.finish()
        except BagError as exc:  # as a single pass does: keep the ticks up to the last readable message
            res.error = str(exc)
            self.sampler.set_end(min(log_ns, last))
            res.samples += self.sampler.finish()
        stats = self.sampler.stats
        res.dropped, res.stale, res.bad, res.skewed = stats.dropped, dict(stats.stale), self.bad_ids, self.skewed
        return res

    def run(self) -> BagReport:
        every = self.windows()
        windows = [w for w in every if w[3] not in self.done_sources]
        self.report.skipped = len(every) - len(windows)
        if not windows:
            return self.report
        conns, stream_of = self._conns()
        w = 0  # index of the next / current window
        active = False
        log_ns = 0
        try:
            for conn, log_ns, raw in self._messages(conns):
                self.report.bytes_read += len(raw)
                self.tick(1)
                if not active and w < len(windows) and log_ns >= windows[w][0]:
                    self._begin(windows[w])
                    active = True
                self._push(conn, raw, log_ns, *stream_of[conn.id])
                self._write(self.sampler.advance(log_ns))
                while active and self.sampler.done:  # every tick up to the end marker is decided
                    self._finish(windows[w])
                    active, w = False, w + 1
                    if w < len(windows) and log_ns >= windows[w][0]:
                        self._begin(windows[w])
                        active = True
                        self._write(self.sampler.advance(log_ns))
        except BagError as exc:
            self.report.error = str(exc)
            if active:  # keep what was read: the ticks up to the last readable message
                self.sampler.set_end(min(log_ns, windows[w][1]))
                self._finish(windows[w], note=f"truncated: {exc}", decide=True)
            return self.report
        except DiskFullError as exc:
            self.report.error = str(exc)
            if active:
                self._finish(windows[w], note=str(exc), decide=False)
            raise
        if active:
            self._write(self.sampler.finish())  # the bag ended: no later message can come
            self._finish(windows[w])
        self.report.bad = {s: n for s, n in self.sampler.stats.bad_total.items() if n}
        return self.report

    def _segment_jobs(self, windows) -> list[tuple[int, bool, tuple]]:
        """(window index, last of its window, job) for every segment. Together the jobs read the whole bag
        once plus margins: the first from the bag's start, the last to its end."""
        sampler, bag = self.sampler, str(self.bag)
        period = sampler.period_ns
        seg = max(1, int(round(self.opt.segment_seconds * NS / period)))
        spans = []  # (window index, lo, last)
        for w, (start, end, _, _) in enumerate(windows):
            bounds = list(range(sampler.first_tick(start), end + 1, period * seg))
            spans += [(w, lo, bounds[k + 1] - 1 if k + 1 < len(bounds) else end) for k, lo in enumerate(bounds)]
        jobs = []
        for j, (w, lo, last) in enumerate(spans):
            final = j + 1 == len(spans)
            read_from = None if j == 0 else lo - sampler.max_age_ns - SKEW_NS
            own_to = None if final else spans[j + 1][1]  # it counts the messages of [lo, next lo), bad ones too
            read_to = None if final else max(own_to, last + SKEW_NS + 1)  # stamps <= last, logged by then
            jobs.append((w, final or spans[j + 1][0] != w, (bag, self.cal, self.opt, lo, last, read_from, read_to, own_to)))
        return jobs

    def run_parallel(self, pool) -> BagReport | None:
        """Each episode cut into segments sampled by ``pool``'s workers, written here in order. Returns None
        (nothing of the current episode written) when a worker met a skewed stamp: convert in one pass."""
        every = self.windows()
        windows = [w for w in every if w[3] not in self.done_sources]
        self.report.skipped = len(every) - len(windows)
        jobs = self._segment_jobs(windows)
        bad_ids: set = set()
        current, dropped, stale, error = None, 0, {}, ""
        results = pool.imap(_segment_job, [job for _, _, job in jobs])
        for (w, window_last, _), res in zip(jobs, results):
            if res.skewed:
                if current is not None:
                    self.writer.discard()
                return None
            if current != w:
                self._begin(windows[w])
                current, dropped, stale = w, 0, {}
            self.tick(res.messages)
            self.report.bytes_read += res.bytes_read
            bad_ids |= res.bad
            error = res.error
            try:
                self._write(res.samples)
            except DiskFullError as exc:  # as a single pass: what was written is committed, then stop
                self.report.error = str(exc)
                self._commit(windows[w], str(exc), dropped, stale)
                raise
            dropped += res.dropped
            for k, n in res.stale.items():
                stale[k] = stale.get(k, 0) + n
            if window_last or error:
                self._commit(windows[w], note=f"truncated: {error}" if error else "", dropped=dropped, stale=stale)
                current = None
            if error:
                self.report.error = error
                break
        bad = {k: n for k, n in self.sampler.stats.bad_total.items() if n}  # episode markers, read here
        for stream, _, _ in bad_ids:
            bad[stream] = bad.get(stream, 0) + 1
        self.report.bad = bad
        return self.report

    def _commit(self, window, note: str = "", dropped: int = 0, stale: dict | None = None) -> None:
        """Commit the current episode and add its counts to the report (single pass and parallel alike)."""
        self.sampler.stop()
        for stamp, name in self.marks:  # the marks of this episode's window, as the recorder takes them live
            if window[0] <= stamp <= window[1]:
                self.writer.mark(stamp, name)
        result = self.writer.commit(note=note)
        self.report.dropped += dropped
        for k, n in (stale or {}).items():
            if n:
                self.report.stale[k] = self.report.stale.get(k, 0) + n
        if result.index >= 0:
            self.report.episodes.append((result.index, result.length))
            self.done_sources.add(window[3])

    def _begin(self, window) -> None:
        start, end, task, source = window
        self.sampler.start(start, end)
        self.writer.start(task=task, source=source)

    def _write(self, samples) -> None:
        for stamp, values in samples:
            try:
                self.writer.add(stamp, values)
            except MessageError as exc:
                self.sampler.bad("frame", str(exc))

    def _finish(self, window, note: str = "", decide: bool = False) -> None:
        if decide:
            self._write(self.sampler.finish())
        stats = self.sampler.stats
        self._commit(window, note, stats.dropped, stats.stale)
        self.report.bad = {s: n for s, n in stats.bad_total.items() if n}  # the whole bag so far


_WORKER_READERS: dict = {}  # bag path -> open reader, per worker process (a pool lives for one convert_bags call)


def _segment_job(job) -> SegmentResult:
    """Run in a worker process: one segment of one episode (see :meth:`_BagSession.sample_segment`)."""
    bag, calibration, options, lo, last, read_from, read_to, own_to = job
    reader = _WORKER_READERS.get(bag)
    if reader is None:
        AnyReader, typestore = _rosbags()
        try:
            reader = AnyReader([Path(bag)], default_typestore=typestore)
            reader.open()
        except Exception as exc:  # noqa: BLE001 - rosbags raises its own and sqlite / mcap errors here
            return SegmentResult(error=f"bag {bag}: cannot open ({type(exc).__name__}: {exc})")
        _WORKER_READERS[bag] = reader
    try:
        session = _BagSession(reader, Path(bag), calibration, options, None, set(), lambda n: None)
        return session.sample_segment(lo, last, read_from, read_to, own_to)
    except BagError as exc:
        return SegmentResult(error=str(exc))


def resolve_workers(workers: int) -> int:
    """``BagOptions.workers`` as a process count: 0 = one per CPU (at most 8)."""
    return workers or min(os.cpu_count() or 1, 8)


def _make_pool(workers: int):
    """Worker processes, forked while this process has no other threads (zarr's and tqdm's start later);
    otherwise from a fork server (forking a multi-threaded process can deadlock)."""
    methods = multiprocessing.get_all_start_methods()
    if threading.active_count() == 1 and "fork" in methods:
        return multiprocessing.get_context("fork").Pool(workers)
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload([__name__])
    return ctx.Pool(workers)


def convert_bags(bags, calibration, out, options: BagOptions | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> list[BagReport]:
    """Convert ``bags`` into the dataset ``out`` (created or appended to); one report per bag.

    A bag that cannot be read is reported with one line and skipped; episodes converted before it
    stay committed.
    """
    options = options or BagOptions()
    if options.stamp_source not in ("header", "receive"):
        raise VqbetError(f"stamp source must be 'header' or 'receive', got {options.stamp_source!r}")
    if not options.future_tolerance >= 0:
        raise VqbetError(f"--future-tolerance must be >= 0 seconds, got {options.future_tolerance}")
    AnyReader, typestore = _rosbags()
    unknown = [n for n in options.camera_topics if n not in calibration.cameras]
    if unknown:
        raise VqbetError(f"--camera {unknown[0]}: not a camera of the calibration {calibration.path} "
                         f"(has: {', '.join(calibration.cameras) or 'none'})")
    if options.workers < 0:
        raise VqbetError(f"workers must be >= 0 (0 = one per CPU), got {options.workers}")
    if not options.segment_seconds > 0:
        raise VqbetError(f"segment seconds must be > 0, got {options.segment_seconds}")
    if options.subtask_topic and not options.task_names:
        raise VqbetError("--subtask-topic needs --task-names (the subtask names data/task_index indexes, in order)")
    if options.task_names and not options.subtask_topic:
        raise VqbetError("--task-names needs --subtask-topic (the topic of the 'subtask done' marks)")
    if len(set(options.task_names)) != len(options.task_names):
        raise VqbetError(f"--task-names has a name twice: {list(options.task_names)}")
    workers = resolve_workers(options.workers)
    pool = _make_pool(workers) if workers > 1 else None  # first: no threads of ours running yet
    try:
        return _convert_all(bags, calibration, out, options, pool, progress, log, AnyReader, typestore)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _convert_all(bags, calibration, out, options, pool, progress, log, AnyReader, typestore) -> list[BagReport]:
    cams = list(camera_topics(calibration, options))
    hz = options.control_hz or calibration.control_hz
    attrs = dataset_attrs(calibration, cams, hz, "bag2zarr", options.settings())
    writer = EpisodeWriter(out, attrs, min_free_mb=options.min_free_mb, stop_free_mb=options.stop_free_mb,
                           flush_every=max(1, int(round(10 * hz))), background=False,
                           check_keys=RECORDING_CHECK_KEYS)  # 10 s batches: fewer zarr calls offline
    if writer.recovered_steps:
        log(f"{out}: truncated {writer.recovered_steps} leftover steps of an interrupted episode")
    done = set(writer.ds.attrs.get("episode_sources") or [])
    reports: dict[int, BagReport] = {}
    bar = None
    try:
        opened = []
        total = 0
        for i, bag in enumerate(bags):
            bag = Path(bag)
            try:
                reader = AnyReader([bag], default_typestore=typestore)
                reader.open()
            except FileNotFoundError:
                reports[i] = BagReport(str(bag), error=f"bag {bag}: not found")
                continue
            except Exception as exc:  # rosbags raises its own and sqlite / mcap errors here
                reports[i] = BagReport(str(bag), error=f"bag {bag}: cannot open ({type(exc).__name__}: {exc})")
                continue
            opened.append((i, bag, reader))
            total += sum(c.msgcount for c in reader.connections)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="msg", desc="bag2zarr", dynamic_ncols=True, mininterval=0.5)
        stop = False
        for i, bag, reader in opened:
            try:
                if stop:
                    continue
                session = None
                tick = bar.update if bar is not None else (lambda n: None)
                session = _BagSession(reader, bag, calibration, options, writer, done, tick)
                report = session.run_parallel(pool) if pool is not None else None
                if report is None:  # a single pass (workers=1, or a bag whose stamps are skewed)
                    first = session.report.episodes if pool is not None else []
                    if pool is not None:
                        log(f"{bag}: header stamps more than {SKEW_NS / NS:g} s from log times; converting in one pass")
                    session = _BagSession(reader, bag, calibration, options, writer, done, tick)
                    report = session.run()
                    report.episodes = first + report.episodes
                    report.skipped -= len(first)
                reports[i] = report
            except BagError as exc:
                reports[i] = BagReport(str(bag), error=str(exc))
            except DiskFullError as exc:  # stop cleanly: what is committed stays
                reports[i] = session.report if session is not None else BagReport(str(bag))
                reports[i].error = str(exc)
                stop = True
            finally:
                reader.close()
    finally:
        if bar is not None:
            bar.close()
        if writer.recording:
            writer.discard()
        writer.close()
    ordered = [reports[i] for i in sorted(reports)]
    for report in ordered:
        if report.error:
            log(f"error: {report.error}")
    return ordered
