"""What the robot needs from a dataset's attrs, checked before training and export (issue 24, item 4).

Why: a dataset without ``joint_names`` (e.g. written by diffusion_policy's ``ReplayBuffer``) used to train
and export silently with generated names ``action_0, action_1, ...`` and a default control rate; the first
complaint came from ``policy_node`` refusing the calibration, on the robot. ``vqbet train`` and ``vqbet
export`` now say in one line what is missing and what they use instead, and ``--joint-names`` /
``--control-hz`` set the values (kept in the run's checkpoint and the exported model.yaml; the dataset is
not changed). Fixing the dataset itself: docs/reference/dataset-format.md.
"""

from __future__ import annotations

import math

from vqbet_core.errors import VqbetError

#: the control rate ``vqbet export`` writes when neither the dataset nor ``--control-hz`` gives one
DEFAULT_CONTROL_HZ = 10.0
DOC = "docs/reference/dataset-format.md"


def parse_joint_names(text: str | None) -> list[str] | None:
    """``--joint-names a,b,c`` -> ``["a", "b", "c"]``; one-line errors for empty or repeated names."""
    if text is None:
        return None
    names = [n.strip() for n in str(text).split(",")]
    if not names or any(not n for n in names):
        raise VqbetError(f"--joint-names expects comma-separated names like shoulder,elbow,wrist; got '{text}'")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise VqbetError(f"--joint-names: {', '.join(repeated)} given more than once")
    return names


def parse_control_hz(value) -> float | None:
    if value is None:
        return None
    try:
        hz = float(value)
    except (TypeError, ValueError):
        hz = float("nan")
    if not (math.isfinite(hz) and hz > 0):
        raise VqbetError(f"--control-hz expects a positive rate in Hz, got '{value}'")
    return hz


def _valid_names(names, action_dim: int) -> bool:
    return isinstance(names, list) and len(names) == action_dim and all(isinstance(n, str) and n for n in names)


def _valid_hz(hz) -> bool:
    return isinstance(hz, (int, float)) and not isinstance(hz, bool) and math.isfinite(hz) and hz > 0


def check_metadata(attrs: dict, *, action_key: str, action_dim: int, image_keys=(), joint_names: list[str] | None = None,
                   control_hz: float | None = None, where: str = "the dataset") -> tuple[dict, str | None]:
    """Check ``attrs`` for what the exported model needs: ``joint_names`` (one per action dimension),
    ``control_hz`` and, per image key ``camera_<name>``, ``cameras.<name>.preprocess``.

    Returns ``(overrides, warning)``: ``overrides`` are attrs to use instead of the dataset's (from the
    options), ``warning`` one line naming what is missing and what is used instead (None when nothing is).
    Raises a one-line :class:`VqbetError` when ``joint_names`` does not have one name per action dimension.
    """
    attrs = attrs or {}
    overrides: dict = {}
    missing, instead, replaced = [], [], []
    if joint_names is not None:
        if len(joint_names) != action_dim:
            raise VqbetError(f"--joint-names gives {len(joint_names)} names but data/{action_key} has {action_dim} "
                             f"dimensions (one name per dimension, in the order of the action vector)")
        overrides["joint_names"] = list(joint_names)
        if _valid_names(attrs.get("joint_names"), action_dim) and list(attrs["joint_names"]) != list(joint_names):
            replaced.append(f"joint_names {attrs['joint_names']}")
    elif not _valid_names(attrs.get("joint_names"), action_dim):
        have = attrs.get("joint_names")
        missing.append("joint_names" if have is None else f"joint_names of the action size ({action_dim}; it has {have!r})")
        instead.append(f"generated names {action_key}_0..{action_key}_{action_dim - 1} (policy_node will refuse "
                       "a calibration with other names)")
    if control_hz is not None:
        overrides["control_hz"] = float(control_hz)
        if _valid_hz(attrs.get("control_hz")) and float(attrs["control_hz"]) != float(control_hz):
            replaced.append(f"control_hz {attrs['control_hz']}")
    elif not _valid_hz(attrs.get("control_hz")):
        missing.append("control_hz")
        instead.append(f"{DEFAULT_CONTROL_HZ:g} Hz")
    cameras = attrs.get("cameras") if isinstance(attrs.get("cameras"), dict) else {}
    for key in image_keys:
        name = key[len("camera_"):] if key.startswith("camera_") else key
        cam = cameras.get(name)
        if not (isinstance(cam, dict) and (cam.get("preprocess") or cam.get("calibration_preprocess"))):
            missing.append(f"cameras.{name}")
            instead.append(f"for {key} the stored frame size, no crop, ImageNet mean/std")
    if not missing and not replaced:
        return overrides, None
    parts = []
    if missing:
        parts.append(f"{where} has no {', '.join(missing)}: using {'; '.join(instead)}; set "
                     + " / ".join(o for o, m in (("--joint-names", "joint_names"), ("--control-hz", "control_hz"))
                                  if any(x.startswith(m) for x in missing))
                     + (" or " if any(x.startswith(("joint_names", "control_hz")) for x in missing) else "")
                     + f"the dataset attrs ({DOC})")
    if replaced:
        parts.append(f"the options replace {where}'s {', '.join(replaced)}")
    return overrides, "warning: " + "; ".join(parts)
