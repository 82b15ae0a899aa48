"""Code sampling and decoding outside the ONNX graph (numpy twin of ``vqbet_core.models.sampling``).

Sampling lives here, not in the graph, so a seeded ``numpy.random.Generator`` makes runs repeatable
and the temperature can change without re-exporting. Decoding is a table look-up plus offsets:
``table[codes] + sum_l offsets[l, codes[l]]`` - the same arithmetic as the torch side, in float32.
"""

from __future__ import annotations

import math

import numpy as np


def sample_code(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """One categorical draw from ``logits (C,)``; temperature <= 0 means argmax (as the torch side).

    Inverse-CDF sampling in plain Python: for tens of codes that is several times faster than a
    chain of small numpy calls, and this runs at every control step.
    """
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.tolist()
    top = max(z)
    weights = [math.exp((v - top) / temperature) for v in z]
    u = rng.random() * math.fsum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if u < acc:
            return i
    return len(weights) - 1


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
    codes = [int(c) for c in codes]
    offset = offsets[0, codes[0]]
    for layer in range(1, len(codes)):
        offset = offset + offsets[layer, codes[layer]]
    return table[tuple(codes)] + offset
