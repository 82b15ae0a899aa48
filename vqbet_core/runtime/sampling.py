"""Code sampling and decoding outside the ONNX graph (numpy twin of ``vqbet_core.models.sampling``).

Sampling lives here, not in the graph, so a seeded ``numpy.random.Generator`` makes runs repeatable
and the temperature can change without re-exporting. Decoding is a table look-up plus offsets:
``table[codes] + sum_l offsets[l, codes[l]]`` - the same arithmetic as the torch side, in float32.
"""

from __future__ import annotations

import numpy as np


def sample_code(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """One categorical draw from ``logits (C,)``; temperature <= 0 means argmax (as the torch side)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def choose_codes(logits: np.ndarray, secondary_given_primary: np.ndarray | None, temperature: float,
                 rng: np.random.Generator, sequential: bool = True) -> np.ndarray:
    """Codes ``(L,)`` for one sample: primary first, then the secondary (given the primary when sequential)."""
    codes = [sample_code(logits[0], temperature, rng)]
    for layer in range(1, logits.shape[0]):
        rows = secondary_given_primary[codes[0]] if layer == 1 and sequential and secondary_given_primary is not None else logits[layer]
        codes.append(sample_code(rows, temperature, rng))
    return np.asarray(codes, dtype=np.int64)


def decode_codes(table: np.ndarray, offsets: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``table[codes] + sum_l offsets[l, codes[l]]`` -> flat normalized chunk ``(W*A,)`` float32."""
    base = table[tuple(int(c) for c in codes)]
    return (base + offsets[np.arange(len(codes)), codes].sum(0)).astype(np.float32)
