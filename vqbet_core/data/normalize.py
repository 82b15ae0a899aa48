"""Per-key normalization statistics (mean / std), stored with the checkpoint and the exported model.

numpy only, so the onnxruntime runtime uses the very same code as training.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from vqbet_core.errors import CheckpointError

STD_FLOOR = 1e-4


class Normalizer:
    """``x_norm = (x - mean) / std`` per key and per feature; std is floored so constant features stay finite."""

    def __init__(self, stats: Mapping[str, Mapping[str, np.ndarray]] | None = None):
        self.stats = {k: {"mean": np.asarray(v["mean"], np.float32), "std": np.asarray(v["std"], np.float32)} for k, v in (stats or {}).items()}

    @classmethod
    def fit(cls, arrays: Mapping[str, np.ndarray]) -> "Normalizer":
        stats = {}
        for key, values in arrays.items():
            flat = np.asarray(values, np.float64).reshape(len(values), -1)
            stats[key] = {"mean": flat.mean(0).astype(np.float32), "std": np.maximum(flat.std(0), STD_FLOOR).astype(np.float32)}
        return cls(stats)

    def _get(self, key: str):
        if key not in self.stats:
            raise CheckpointError(f"normalization statistics for key '{key}' are missing (have: {sorted(self.stats)})")
        return self.stats[key]

    def normalize(self, key: str, x):
        s = self._get(key)
        return (x - s["mean"]) / s["std"]

    def unnormalize(self, key: str, x):
        s = self._get(key)
        return x * s["std"] + s["mean"]

    def to_flat(self) -> dict[str, np.ndarray]:
        """Flat ``{"<key>.mean": array, "<key>.std": array}`` for safetensors / YAML."""
        return {f"{k}.{stat}": v[stat] for k, v in self.stats.items() for stat in ("mean", "std")}

    @classmethod
    def from_flat(cls, flat: Mapping[str, np.ndarray]) -> "Normalizer":
        stats: dict[str, dict[str, np.ndarray]] = {}
        for name, value in flat.items():
            key, _, stat = name.rpartition(".")
            stats.setdefault(key, {})[stat] = np.asarray(value, np.float32)
        for key, s in stats.items():
            if set(s) != {"mean", "std"}:
                raise CheckpointError(f"normalization statistics for '{key}' need mean and std (have {sorted(s)})")
        return cls(stats)
