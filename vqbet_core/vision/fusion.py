"""The one definition of an observation vector: normalized low-dim keys, then camera features.

Training (whole dataset, batches of windows) and the runtime (one step) both build the GPT's
per-step observation here, so the order can never drift: ``obs_keys`` in config order, then
``image_keys`` in config order, each contributing its last axis. Leading axes (steps, batch, time)
must agree across keys. Works on numpy arrays, or on torch tensors when fine-tuning the encoder.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from vqbet_core.errors import VqbetError


def _parts(lowdim: Mapping, image_features: Mapping, obs_keys: Sequence[str], image_keys: Sequence[str]) -> list:
    parts = []
    for source, keys, what in ((lowdim, obs_keys, "low-dim observation"), (image_features, image_keys, "image features")):
        for key in keys:
            if key not in source:
                raise VqbetError(f"{what} '{key}' is missing (have: {', '.join(sorted(source)) or 'none'})")
            value = source[key]
            if value.ndim < 1:
                raise VqbetError(f"{what} '{key}' must have a feature axis, got a scalar")
            parts.append((key, value))
    if not parts:
        raise VqbetError("no observation keys: obs_keys and image_keys are both empty")
    lead = parts[0][1].shape[:-1]
    for key, value in parts[1:]:
        if tuple(value.shape[:-1]) != tuple(lead):
            raise VqbetError(
                f"observation '{key}' has leading shape {tuple(value.shape[:-1])} but '{parts[0][0]}' has {tuple(lead)}"
            )
    return parts


def fuse_observation(lowdim: Mapping, image_features: Mapping, obs_keys: Sequence[str], image_keys: Sequence[str]):
    """Concatenate ``lowdim[k]`` for k in ``obs_keys`` then ``image_features[k]`` for k in ``image_keys`` (last axis).

    Low-dim values must already be normalized. Returns float32 ``(..., D)``: a numpy array, or a torch
    tensor when every input is a tensor.
    """
    parts = _parts(lowdim, image_features, obs_keys, image_keys)
    values = [v for _, v in parts]
    is_numpy = [isinstance(v, np.ndarray) for v in values]
    if all(is_numpy):
        return np.concatenate([v.astype(np.float32, copy=False) for v in values], axis=-1)
    import torch

    if not all(isinstance(v, torch.Tensor) for v in values):
        raise VqbetError("observation parts mix numpy arrays and torch tensors (pass all of one kind)")
    return torch.cat([v.float() for v in values], dim=-1)


def fusion_layout(dims: Mapping[str, int], obs_keys: Sequence[str], image_keys: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Where each key lands in the fused vector: ``{key: (start, stop)}`` (for model.yaml and checks)."""
    layout, start = {}, 0
    for key in list(obs_keys) + list(image_keys):
        if key not in dims:
            raise VqbetError(f"observation '{key}' has no known size (have: {', '.join(sorted(dims)) or 'none'})")
        layout[key] = (start, start + int(dims[key]))
        start += int(dims[key])
    return layout
