"""ROS message <-> numpy for the nodes (recorder now, policy later).

The decoding itself is :mod:`vqbet_core.recording.messages` (duck-typed, shared with the offline
``bag2zarr``, so live and bag data decode identically); this module adds what needs ROS: cv_bridge for
exotic image encodings when it is installed, ROS time conversion, and building messages from arrays.
Bad messages raise :class:`MessageError` (a ``ValueError``) with one line.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image, JointState

from vqbet_core.recording import messages as _m
from vqbet_core.recording.messages import (  # noqa: F401 - re-exported for the nodes
    ENCODING_CHANNELS,
    FutureStampError,
    JointMapper,
    MessageError,
    check_compressed,
    check_image,
    check_stamp,
    choose_stamp,
    command_kind,
    compressed_to_rgb,
    stamp_ns,
)
from vqbet_core.vision.preprocess import ImagePreprocess

try:  # optional: only for encodings the built-in decoder does not handle (16-bit, bayer, yuv422)
    from cv_bridge import CvBridge

    _BRIDGE = CvBridge()
except Exception:  # noqa: BLE001 - absent, or the old ROS 1 copy that fails with numpy 2
    _BRIDGE = None


def _cv_bridge_rgb(msg) -> np.ndarray:
    return np.asarray(_BRIDGE.imgmsg_to_cv2(msg, desired_encoding="rgb8"))


def has_cv_bridge() -> bool:
    return _BRIDGE is not None


def image_to_rgb(msg: Image) -> np.ndarray:
    """``sensor_msgs/Image`` -> RGB uint8 ``(H, W, 3)`` (rgb8/bgr8/mono8/rgba8/bgra8; more with cv_bridge)."""
    return np.ascontiguousarray(_m.image_to_rgb(msg, _cv_bridge_rgb if _BRIDGE else None))


def frame_for_dataset(msg, preprocess: ImagePreprocess | None, compressed: bool) -> np.ndarray:
    """Image / CompressedImage -> RGB uint8 frame, cropped and resized by ``preprocess`` when given."""
    return _m.frame_for_dataset(msg, preprocess, compressed, _cv_bridge_rgb if _BRIDGE else None)


def joint_positions(msg: JointState, mapper: JointMapper) -> np.ndarray:
    """JointState -> float32 positions in calibration order (by name; missing joints / NaN / mismatch raise)."""
    return mapper.from_joint_state(msg)


def ns_to_time(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def rgb_to_image(rgb: np.ndarray, stamp: int, encoding: str = "rgb8", frame_id: str = "") -> Image:
    """RGB uint8 ``(H, W, 3)`` -> ``sensor_msgs/Image`` in rgb8, bgr8 or mono8."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[:, :, ::-1]
    elif encoding == "mono8":
        pixels = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    else:
        raise MessageError(f"cannot encode an image as {encoding!r} (rgb8, bgr8, mono8)")
    msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, is_bigendian=0,
                step=rgb.shape[1] * (1 if encoding == "mono8" else 3))
    msg.header.stamp = ns_to_time(stamp)
    msg.header.frame_id = frame_id
    msg.data = np.ascontiguousarray(pixels).tobytes()
    return msg


def rgb_to_compressed(rgb: np.ndarray, stamp: int, fmt: str = "jpeg", frame_id: str = "") -> CompressedImage:
    """RGB uint8 -> ``sensor_msgs/CompressedImage`` (jpeg or png)."""
    ext = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}.get(fmt)
    if ext is None:
        raise MessageError(f"cannot compress an image as {fmt!r} (jpeg, png)")
    ok, buf = cv2.imencode(ext, cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR))
    if not ok:
        raise MessageError(f"cv2.imencode failed for {fmt}")
    msg = CompressedImage(format=fmt)
    msg.header.stamp = ns_to_time(stamp)
    msg.header.frame_id = frame_id
    msg.data = buf.tobytes()
    return msg


def joint_state(names: Sequence[str], positions: Sequence[float], stamp: int) -> JointState:
    msg = JointState(name=list(names), position=[float(p) for p in positions])
    msg.header.stamp = ns_to_time(stamp)
    return msg
