"""Code sampling and decoding from the deterministic heads (torch side).

The onnxruntime runtime does the same arithmetic in numpy (``vqbet_core.runtime``); the export
parity check compares both on the same sampled codes.
"""

from __future__ import annotations

import torch

from vqbet_core.models.base import Heads


def sample_codes(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Categorical sample per row of ``logits (B, C)``; temperature 0 means argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def choose_codes(h: Heads, temperature: float = 1.0, generator: torch.Generator | None = None,
                 sequential: bool = True) -> torch.Tensor:
    """Codes ``(B, L)``: primary first, then the secondary (conditioned on it when sequential)."""
    codes = [sample_codes(h.logits[:, 0], temperature, generator)]
    for layer in range(1, h.logits.shape[1]):
        if layer == 1 and sequential and h.secondary_given_primary is not None:
            rows = h.secondary_given_primary[torch.arange(len(codes[0])), codes[0]]
        else:
            rows = h.logits[:, layer]
        codes.append(sample_codes(rows, temperature, generator))
    return torch.stack(codes, dim=1)


def decode_codes(h: Heads, table: torch.Tensor, codes: torch.Tensor, chunk: int, action_dim: int) -> torch.Tensor:
    """``table[codes] + sum_l offsets[l, codes[:, l]]`` reshaped to ``(B, W, A)``."""
    batch = torch.arange(codes.shape[0], device=codes.device)
    base = table[tuple(codes[:, l] for l in range(codes.shape[1]))]
    offset = sum(h.offsets[batch, l, codes[:, l]] for l in range(codes.shape[1]))
    return (base + offset).reshape(-1, chunk, action_dim)


def sample_and_decode(h: Heads, table: torch.Tensor, chunk: int, action_dim: int, temperature: float = 1.0,
                      generator: torch.Generator | None = None, sequential: bool = True) -> torch.Tensor:
    codes = choose_codes(h, temperature, generator, sequential)
    return decode_codes(h, table, codes, chunk, action_dim)
