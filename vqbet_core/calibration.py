"""Per-robot calibration YAML (``calibration/<robot>.yaml``): joint order and limits, cameras, image crop/resize.

Joint order here is *the* order of ``robot_joint`` and ``action`` columns everywhere (datasets, models,
trajectories); ROS messages are always mapped into it by joint name, never by index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from vqbet_core.errors import VqbetError
from vqbet_core.vision.preprocess import ImagePreprocess


@dataclass
class CameraCalibration:
    name: str
    topic: str
    preprocess: ImagePreprocess
    compressed: bool = False
    camera_info: dict = field(default_factory=dict)  # ROS camera_info layout (image_width, camera_matrix, ...)


@dataclass
class Calibration:
    robot: str
    joint_names: list[str]
    lower: np.ndarray
    upper: np.ndarray
    max_velocity: np.ndarray  # rad/s (or m/s) per joint
    cameras: dict[str, CameraCalibration]
    control_hz: float = 10.0
    path: str = ""

    def clamp(self, positions: np.ndarray) -> np.ndarray:
        return np.clip(positions, self.lower, self.upper)

    def to_attrs(self) -> dict:
        """What datasets and model.yaml record about the robot."""
        return {
            "robot": self.robot,
            "joint_names": list(self.joint_names),
            "control_hz": self.control_hz,
            "cameras": {n: {"topic": c.topic, "preprocess": c.preprocess.to_dict()} for n, c in self.cameras.items()},
        }


def _vector(raw: dict, key: str, n: int, where: str, default=None) -> np.ndarray:
    value = raw.get(key, default)
    if value is None:
        raise VqbetError(f"{where}: joint_limits.{key} is missing (expected {n} numbers)")
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1 and n > 1:
        arr = np.full(n, float(arr[0]))
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise VqbetError(f"{where}: joint_limits.{key} must have {n} finite numbers (one per joint), got {value}")
    return arr


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    if not path.exists():
        raise VqbetError(f"calibration file not found: {path}")
    if not path.is_file():
        raise VqbetError(f"calibration {path} is not a file (expected a calibration YAML)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise VqbetError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise VqbetError(f"{path}: expected a mapping (joint_names, joint_limits, cameras, ...), got {type(raw).__name__}")
    where = str(path)
    names = raw.get("joint_names")
    if not names or not all(isinstance(n, str) for n in names):
        raise VqbetError(f"{where}: joint_names must be a non-empty list of joint names")
    if len(set(names)) != len(names):
        raise VqbetError(f"{where}: joint_names has duplicates")
    limits = raw.get("joint_limits") or {}
    n = len(names)
    lower = _vector(limits, "lower", n, where)
    upper = _vector(limits, "upper", n, where)
    if np.any(lower >= upper):
        raise VqbetError(f"{where}: joint_limits.lower must be below joint_limits.upper for every joint")
    velocity = _vector(limits, "velocity", n, where)
    cameras = {}
    for name, cam in (raw.get("cameras") or {}).items():
        if not isinstance(cam, dict) or "topic" not in cam:
            raise VqbetError(f"{where}: cameras.{name} needs at least a topic")
        pre = ImagePreprocess.from_dict({k: cam[k] for k in ("size", "crop", "mean", "std") if k in cam})
        cameras[name] = CameraCalibration(name, cam["topic"], pre, bool(cam.get("compressed", False)), cam.get("camera_info") or {})
    return Calibration(raw.get("robot", path.stem), list(names), lower, upper, velocity, cameras,
                       float(raw.get("control_hz", 10.0)), str(path))
