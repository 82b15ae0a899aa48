"""The one image preprocessing definition used by the recorder, training, export and the runtime.

Real deployments drift when the camera frame is cropped / resized / colour-converted differently at
record time and at run time, so every caller goes through :class:`ImagePreprocess`:

1. ``crop_resize``: raw RGB uint8 frame -> crop box (x, y, w, h in source pixels) -> resize to
   ``size`` (width, height) with area interpolation -> RGB uint8. Stored this way in datasets.
2. ``to_model_input``: RGB uint8 ``(..., H, W, 3)`` -> float32 ``(..., 3, H, W)`` in [0, 1], minus mean, over std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from vqbet_core.errors import VqbetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def area_resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Box-filter (``INTER_AREA``) resize to ``size`` (w, h), halving first while the frame is >= 2x the target.

    Why: OpenCV's area filter is ~3x slower for non-integer ratios (640x480 -> 96x96: 0.8-1.2 ms) than
    an exact 2x2 mean followed by the remaining ratio (0.47 ms); the result differs by a rounding step.
    Recorder, bag2zarr, training and the run-time all call this, so they stay identical.
    """
    w, h = size
    while frame.shape[1] >= 2 * w and frame.shape[0] >= 2 * h:
        frame = cv2.resize(frame, (frame.shape[1] // 2, frame.shape[0] // 2), interpolation=cv2.INTER_AREA)
    if (frame.shape[1], frame.shape[0]) != (w, h):
        frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    return frame


@dataclass
class ImagePreprocess:
    size: tuple[int, int] = (96, 96)  # (width, height) after resize
    crop: tuple[int, int, int, int] | None = None  # (x, y, w, h) in source pixels, None = full frame
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self):
        self.size = (int(self.size[0]), int(self.size[1]))
        if self.crop is not None:
            self.crop = tuple(int(v) for v in self.crop)
            if len(self.crop) != 4 or self.crop[2] <= 0 or self.crop[3] <= 0:
                raise VqbetError(f"image crop must be [x, y, width, height] with positive size, got {list(self.crop)}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    def crop_resize(self, frame: np.ndarray) -> np.ndarray:
        """RGB uint8 ``(H, W, 3)`` camera frame -> RGB uint8 ``(size[1], size[0], 3)``."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise VqbetError(f"image must be RGB uint8 (H, W, 3), got {frame.dtype} {tuple(frame.shape)}")
        if self.crop is not None:
            x, y, w, h = self.crop
            if x < 0 or y < 0 or x + w > frame.shape[1] or y + h > frame.shape[0]:
                raise VqbetError(f"image crop {list(self.crop)} does not fit a {frame.shape[1]}x{frame.shape[0]} frame")
            frame = frame[y : y + h, x : x + w]
        return np.ascontiguousarray(area_resize(frame, self.size))

    def to_model_input(self, images: np.ndarray) -> np.ndarray:
        """RGB uint8 ``(..., H, W, 3)`` -> normalized float32 ``(..., 3, H, W)``."""
        x = np.asarray(images, dtype=np.float32) * (1.0 / 255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(np.moveaxis(x, -1, -3))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ImagePreprocess":
        d = dict(d or {})
        unknown = set(d) - {"size", "crop", "mean", "std"}
        if unknown:
            raise VqbetError(f"unknown image preprocessing keys {sorted(unknown)} (expected size, crop, mean, std)")
        return cls(**d)


def dataset_camera_preprocess(attrs: dict, key: str, frame_shape: tuple, image_size=None) -> ImagePreprocess:
    """The preprocessing a dataset's ``camera_<name>`` frames were recorded with (crop, size, mean/std).

    Taken from the dataset attrs written by ``Calibration.to_attrs`` (``cameras.<name>.preprocess``);
    datasets without it (simulation) get the defaults at the stored frame size. Stored frames are
    already crop-resized, so their ``(H, W)`` must equal the recorded size and, when given,
    ``image_size`` ((width, height)) - a mismatch means the config and the data disagree.
    """
    name = key[len("camera_"):] if key.startswith("camera_") else key
    h, w = int(frame_shape[0]), int(frame_shape[1])
    camera = ((attrs or {}).get("cameras") or {}).get(name) or {}
    recorded = camera.get("preprocess") if isinstance(camera, dict) else None
    pre = ImagePreprocess.from_dict(recorded) if recorded else ImagePreprocess(size=(w, h))
    if pre.size != (w, h):
        raise VqbetError(f"data/{key}: frames are {w}x{h} but the recorded preprocessing says {pre.size[0]}x{pre.size[1]}")
    if image_size is not None and tuple(image_size) != (w, h):
        raise VqbetError(
            f"data/{key}: frames are {w}x{h} but vision.image_size is {image_size[0]}x{image_size[1]} "
            f"(set vision.image_size to {w if w == h else [w, h]} or re-record at that size)"
        )
    return pre
