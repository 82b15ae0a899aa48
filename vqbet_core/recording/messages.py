"""ROS message -> numpy, for rclpy messages and ``rosbags`` message objects alike (duck-typed, no ROS import).

Why here and duck-typed: the recorder node (rclpy) and ``bag2zarr`` (rosbags, no ROS install) must turn the
same message into the same array, bit for bit, so there is one implementation. Both libraries expose the
same field names (``header.stamp.sec``, ``encoding``, ``data``, ``name``, ``position``, ``points``), and
their byte fields (``array.array`` / ``bytes`` / numpy) all support the buffer protocol.

Every bad message raises :class:`MessageError` (a ``ValueError``) with one line saying what is wrong; the
callers count it and skip the message, never crash.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import cv2
import numpy as np

from vqbet_core.errors import VqbetError
from vqbet_core.vision.preprocess import ImagePreprocess


class MessageError(VqbetError, ValueError):
    """A malformed message (wrong encoding or size, mismatched joint arrays, NaN): counted and skipped."""


#: encodings decoded here without any ROS library; others go to a caller-supplied fallback
ENCODING_CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1, "8UC1": 1, "8UC3": 3, "rgba8": 4, "bgra8": 4}


def stamp_ns(msg) -> int:
    """Header stamp of a message in integer nanoseconds (0 when unset)."""
    stamp = msg.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class FutureStampError(MessageError):
    """A stamp further ahead of the receive time than the future tolerance (the clock rule, :mod:`.clock`)."""


#: the default future tolerance in ns (:data:`vqbet_core.recording.clock.DEFAULT_FUTURE_TOLERANCE`)
FUTURE_TOLERANCE_NS = 100_000_000


def check_stamp(stamp_ns: int, receive_ns: int, future_tolerance_ns: int = FUTURE_TOLERANCE_NS) -> int:
    """``stamp_ns``, or :class:`FutureStampError` when it is more than the tolerance ahead of ``receive_ns``."""
    ahead = int(stamp_ns) - int(receive_ns)
    if ahead > future_tolerance_ns:
        raise FutureStampError(f"stamp is {ahead / 1e9:.3f} s ahead of the receive time (future_tolerance "
                               f"{future_tolerance_ns / 1e9:g} s): the sender's clock runs ahead of this one")
    return int(stamp_ns)


def choose_stamp(msg, receive_ns: int, source: str, future_tolerance_ns: int = FUTURE_TOLERANCE_NS) -> int:
    """The time a message is sampled by: its header stamp, or the receive/log time.

    ``source='header'`` falls back to the receive time when the stamp is unset (zero), as teleop
    ``JointTrajectory`` messages usually are ("start now"). A header stamp more than
    ``future_tolerance_ns`` ahead of ``receive_ns`` raises :class:`FutureStampError` (a bad message:
    counted, not used), the clock rule of :mod:`vqbet_core.recording.clock`.
    """
    if source == "receive":
        return int(receive_ns)
    header = getattr(msg, "header", None)
    if header is None:
        return int(receive_ns)
    value = stamp_ns(msg)
    return check_stamp(value, receive_ns, future_tolerance_ns) if value > 0 else int(receive_ns)


def _bytes(data) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)


def check_image(msg) -> None:
    """Cheap checks of a ``sensor_msgs/Image`` (encoding, sizes) without decoding the pixels."""
    enc = msg.encoding
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise MessageError(f"image has size {w}x{h} (expected a positive width and height)")
    channels = ENCODING_CHANNELS.get(enc)
    if channels is None:
        return  # checked by the fallback decoder
    if step < w * channels:
        raise MessageError(f"image step {step} is smaller than width*channels = {w * channels} for {enc}")
    n = len(msg.data)
    if n != step * h:
        raise MessageError(f"image data has {n} bytes, expected step*height = {step}*{h} = {step * h} ({enc} {w}x{h})")


def image_to_rgb(msg, fallback: Callable[[object], np.ndarray] | None = None) -> np.ndarray:
    """``sensor_msgs/Image`` (rgb8, bgr8, mono8, rgba8, bgra8) -> RGB uint8 ``(H, W, 3)``.

    ``fallback(msg) -> RGB uint8`` handles any other encoding (cv_bridge in the node, rosbags-image
    offline); without one, other encodings are a :class:`MessageError`.
    """
    enc = msg.encoding
    if enc not in ENCODING_CHANNELS:
        if fallback is None:
            raise MessageError(f"unsupported image encoding {enc!r} (expected one of {', '.join(ENCODING_CHANNELS)})")
        try:
            rgb = np.asarray(fallback(msg))
        except MessageError:
            raise
        except Exception as exc:  # third-party converters raise anything
            raise MessageError(f"cannot convert image encoding {enc!r}: {type(exc).__name__}: {exc}") from None
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise MessageError(f"image encoding {enc!r} did not convert to RGB uint8 (got {rgb.dtype} {rgb.shape})")
        return rgb
    check_image(msg)
    channels = ENCODING_CHANNELS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    raw = _bytes(msg.data).reshape(h, step)[:, : w * channels].reshape(h, w, channels)
    if enc in ("rgb8", "8UC3"):
        return raw
    if enc == "bgr8":
        return raw[:, :, ::-1]
    if enc in ("mono8", "8UC1"):
        return np.repeat(raw, 3, axis=2)
    if enc == "rgba8":
        return raw[:, :, :3]
    return raw[:, :, 2::-1]  # bgra8


JPEG_SOI, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
PNG_SIGNATURE, PNG_IEND = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(buf: bytes) -> tuple[int, int]:
    """(width, height) from the SOF segment, walking the header segments up to the scan; ValueError if broken."""
    pos = 2
    for _ in range(128):
        if pos + 4 > len(buf) or buf[pos] != 0xFF:
            break
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
        if marker in _JPEG_SOF:
            if length < 8 or pos + 9 > len(buf):
                break
            return int.from_bytes(buf[pos + 7 : pos + 9], "big"), int.from_bytes(buf[pos + 5 : pos + 7], "big")
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            break
        pos += 2 + length
    raise ValueError("no frame header (SOF) before the image data")


def check_compressed(msg) -> None:
    """Cheap checks of a ``sensor_msgs/CompressedImage`` on arrival, without decoding it.

    JPEG: start-of-image marker, a frame header with a positive size, end-of-image marker at the end
    (a truncated JPEG has none). PNG: signature, IHDR with a positive size, IEND chunk at the end.
    Anything else (no data, other formats) is a :class:`MessageError`. A frame that passes these but
    still fails to decode is found when it is decoded (:func:`compressed_to_rgb`).
    """
    buf = _bytes(msg.data)
    what = f"compressed image ({msg.format or 'no format'}, {buf.size} bytes)"
    if buf.size == 0:
        raise MessageError(f"compressed image ({msg.format or 'no format'}) has no data")
    end = buf[-4096:]
    nonzero = np.flatnonzero(end)  # some drivers pad frames with zero bytes after the end marker
    head, tail = bytes(buf[:64]), bytes(end[: (nonzero[-1] + 1) if nonzero.size else 0][-32:])
    if head.startswith(JPEG_SOI):
        try:
            w, h = _jpeg_size(bytes(buf[: 1 << 16]))
        except ValueError as exc:
            raise MessageError(f"{what}: broken JPEG header: {exc}") from None
        if w <= 0 or h <= 0:
            raise MessageError(f"{what}: JPEG size {w}x{h} (expected a positive width and height)")
        if JPEG_EOI not in tail:
            raise MessageError(f"{what}: truncated JPEG (no end-of-image marker FFD9 at its end)")
    elif head.startswith(PNG_SIGNATURE):
        if buf.size < 8 + 25 + 12 or head[12:16] != b"IHDR":
            raise MessageError(f"{what}: truncated PNG (no IHDR chunk after the signature)")
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if w <= 0 or h <= 0:
            raise MessageError(f"{what}: PNG size {w}x{h} (expected a positive width and height)")
        if not tail.endswith(PNG_IEND):
            raise MessageError(f"{what}: truncated PNG (no IEND chunk at its end)")
    else:
        raise MessageError(f"{what} is neither JPEG nor PNG (starts with {head[:4].hex()})")


def compressed_to_rgb(msg) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg, png) -> RGB uint8 ``(H, W, 3)`` via ``cv2.imdecode``."""
    check_compressed(msg)
    buf = _bytes(msg.data)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise MessageError(f"compressed image ({msg.format or 'no format'}, {buf.size} bytes) cannot be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def frame_for_dataset(msg, preprocess: ImagePreprocess | None, compressed: bool,
                      fallback: Callable[[object], np.ndarray] | None = None) -> np.ndarray:
    """Image or CompressedImage -> the RGB uint8 frame a dataset stores (cropped/resized when ``preprocess``)."""
    rgb = compressed_to_rgb(msg) if compressed else image_to_rgb(msg, fallback)
    if preprocess is None:
        return np.ascontiguousarray(rgb)
    try:
        return preprocess.crop_resize(np.ascontiguousarray(rgb))
    except VqbetError as exc:  # a crop that does not fit this frame: a bad message, not a crash
        raise MessageError(str(exc)) from None


class JointMapper:
    """Maps ``JointState`` / ``JointTrajectory`` messages into calibration joint order, by name.

    The index map is cached per name tuple, so a publisher with a fixed (even shuffled) order costs one
    dict lookup per message.
    """

    def __init__(self, joint_names: Sequence[str]):
        self.joint_names = list(joint_names)
        self._cache: dict[tuple, np.ndarray] = {}

    def _index(self, names) -> np.ndarray:
        key = tuple(names)
        idx = self._cache.get(key)
        if idx is None:
            lookup = {n: i for i, n in enumerate(key)}
            if len(lookup) != len(key):
                raise MessageError(f"joint names contain duplicates: {list(key)}")
            missing = [n for n in self.joint_names if n not in lookup]
            if missing:
                raise MessageError(f"message lacks joints {missing} (has {list(key)})")
            idx = np.array([lookup[n] for n in self.joint_names], dtype=np.int64)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = idx
        return idx

    def map(self, names, values, what: str = "position") -> np.ndarray:
        """``values[i]`` belongs to ``names[i]``; returns float32 values in calibration order."""
        vals = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(names) != vals.size:
            raise MessageError(f"{len(names)} joint names but {vals.size} {what} values")
        out = vals[self._index(names)]
        if not np.all(np.isfinite(out)):
            bad = [self.joint_names[i] for i in np.flatnonzero(~np.isfinite(out))]
            raise MessageError(f"non-finite {what} for joints {bad}")
        return out.astype(np.float32)

    def from_joint_state(self, msg) -> np.ndarray:
        return self.map(msg.name, msg.position)

    def from_trajectory(self, msg) -> np.ndarray:
        """First point of a ``JointTrajectory`` (the immediate target a teleop device streams)."""
        if len(msg.points) == 0:
            raise MessageError("joint trajectory has no points")
        return self.map(msg.joint_names, msg.points[0].positions, "trajectory position")

    def from_command(self, msg, kind: str) -> np.ndarray:
        return self.from_trajectory(msg) if kind == "JointTrajectory" else self.from_joint_state(msg)


def command_kind(msgtype: str) -> str:
    """'JointState' or 'JointTrajectory' from a type name such as ``sensor_msgs/msg/JointState``."""
    short = msgtype.rsplit("/", 1)[-1]
    if short not in ("JointState", "JointTrajectory"):
        raise MessageError(f"teleop command type {msgtype!r} is not JointState or JointTrajectory")
    return short


def parse_subtask_mark(data: str, now_ns: int) -> tuple[str, int]:
    """A ``~/subtask_done`` message -> (subtask name, stamp ns): a plain name (stamped ``now_ns``, the receive
    time) or JSON ``{"task": name, "stamp": seconds}`` (or ``"stamp_ns"``; no stamp = the receive time).

    Seconds are resolved to the microsecond: a float64 carries only ~0.2 us at today's epoch, and a mark
    stamped with a control tick's time (the simulator's completions) must not land a few ns after it.
    Used by ``recorder_node`` (live) and ``bag2zarr --subtask-topic`` (``now_ns`` = the bag's log time)."""
    text = data.strip()
    if not text.startswith("{"):
        if not text:
            raise MessageError("empty subtask mark: expected a subtask name or JSON {\"task\": name, \"stamp\": seconds}")
        return text, int(now_ns)
    try:
        obj = json.loads(text)
        task = str(obj["task"]).strip()
        if obj.get("stamp_ns") is not None:
            stamp = int(obj["stamp_ns"])
        elif obj.get("stamp") is not None:
            stamp = int(round(float(obj["stamp"]) * 1e6)) * 1000
        else:
            stamp = int(now_ns)
    except (ValueError, KeyError, TypeError) as exc:
        raise MessageError(f"subtask mark is not JSON {{\"task\": name, \"stamp\": seconds}} ({type(exc).__name__}: {exc})") from None
    if stamp <= 0:
        raise MessageError(f"subtask mark stamp {stamp} ns: expected a time > 0")
    return task, stamp
