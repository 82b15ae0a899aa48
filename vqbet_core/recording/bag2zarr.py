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

Each episode's source (``<bag path>#<k>``) is kept in ``.zattrs`` ``episode_sources``; converting a bag
again skips the episodes already in the dataset, so a run interrupted by a corrupt bag can be repeated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vqbet_core.errors import VqbetError
from vqbet_core.recording.messages import (
    JointMapper,
    MessageError,
    check_image,
    choose_stamp,
    command_kind,
    frame_for_dataset,
)
from vqbet_core.recording.sampler import (
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
    preprocess: bool = True
    task: str = ""
    min_free_mb: float = 1024.0
    stop_free_mb: float = 256.0

    def settings(self) -> dict:
        return {"max_age": self.max_age, "max_wait": self.max_wait, "stamp_source": self.stamp_source,
                "preprocess_images": self.preprocess}


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
        """(start, end, task, source id) of every episode in this bag, in order."""
        bag_id = str(self.bag.resolve())
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

    def _bad_marker(self, exc) -> None:
        self.sampler.bad(self.opt.episode_topic, f"bad episode marker: {exc}")

    def _messages(self, conns):
        topic = "?"
        try:
            for conn, log_ns, raw in self.reader.messages(connections=conns):
                topic = conn.topic
                yield conn, log_ns, raw
        except VqbetError:
            raise
        except Exception as exc:  # sqlite3 / mcap / rosbags errors: one line naming bag and topic
            raise BagError(f"bag {self.bag}: corrupt or truncated (reading {topic} and the messages after it): "
                           f"{type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ replay
    def _convert(self, msg, kind):
        what, cam = kind
        if what == "joint_state":
            return self.mapper.from_joint_state(msg)
        if what == "command":
            return self.mapper.from_command(msg, self.command_kind)
        compressed = what == "compressed"
        if not compressed:
            check_image(msg)
        pre = self.preprocess[cam]
        return Lazy(lambda: frame_for_dataset(msg, pre, compressed, _image_fallback))

    def _push(self, conn, raw, log_ns, stream, kind) -> None:
        """One bag message into the sampler, exactly as the node's callbacks do it."""
        try:
            msg = self.reader.deserialize(raw, conn.msgtype)
        except Exception as exc:  # undeserializable bytes: a bad message, not a crash
            self.sampler.bad(stream, f"cannot deserialize {conn.msgtype}: {type(exc).__name__}: {exc}")
            return
        stamp = choose_stamp(msg, log_ns, self.opt.stamp_source)
        try:
            value = self._convert(msg, kind)
        except MessageError as exc:
            self.sampler.bad(stream, str(exc), stamp)
            return
        self.sampler.push(stream, stamp, value)

    def run(self) -> BagReport:
        every = self.windows()
        windows = [w for w in every if w[3] not in self.done_sources]
        self.report.skipped = len(every) - len(windows)
        if not windows:
            return self.report
        conns = [c for t in self.streams for c in self.by_topic[t]]
        stream_of = {c.id: self.streams[c.topic] for c in conns}
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
        self.sampler.stop()
        result = self.writer.commit(note=note)
        stats = self.sampler.stats
        self.report.dropped += stats.dropped
        for s, n in stats.stale.items():
            if n:
                self.report.stale[s] = self.report.stale.get(s, 0) + n
        self.report.bad = {s: n for s, n in stats.bad_total.items() if n}  # the whole bag so far
        if result.index >= 0:
            self.report.episodes.append((result.index, result.length))
            self.done_sources.add(window[3])


def convert_bags(bags, calibration, out, options: BagOptions | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> list[BagReport]:
    """Convert ``bags`` into the dataset ``out`` (created or appended to); one report per bag.

    A bag that cannot be read is reported with one line and skipped; episodes converted before it
    stay committed.
    """
    options = options or BagOptions()
    if options.stamp_source not in ("header", "receive"):
        raise VqbetError(f"stamp source must be 'header' or 'receive', got {options.stamp_source!r}")
    AnyReader, typestore = _rosbags()
    unknown = [n for n in options.camera_topics if n not in calibration.cameras]
    if unknown:
        raise VqbetError(f"--camera {unknown[0]}: not a camera of the calibration {calibration.path} "
                         f"(has: {', '.join(calibration.cameras) or 'none'})")
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
                session = _BagSession(reader, bag, calibration, options, writer, done,
                                      bar.update if bar is not None else (lambda n: None))
                reports[i] = session.run()
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
