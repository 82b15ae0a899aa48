"""Residual VQ-VAE action tokenizer (VQ-BeT phase 1): action chunk <-> L codes of C each.

MLP encoder (W*A -> hidden -> hidden -> code_dim) -> ``vector_quantize_pytorch.ResidualVQ`` with EMA
codebooks -> MLP decoder mirroring the encoder; loss = L1 reconstruction + commitment, as in the
official code. Two deliberate differences, both measurable through ``stats``: dead codes are
restarted (``threshold_ema_dead_code``) so the codebook cannot collapse, and usage (codes per layer,
code pairs, perplexity) is reported. Gradients pass the quantizer with the plain straight-through
estimator (the official choice), not the library's default rotation trick.

Every piece of codebook state (``embed``, ``embed_avg``, ``cluster_size``, ``initted``) is a
persistent buffer of the ResidualVQ layers, so a ``state_dict`` round trip restores the tokenizer
exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import ResidualVQ

from vqbet_core.errors import VqbetError


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    for layer in layers:
        if isinstance(layer, nn.Linear):  # official VQ-BeT init
            nn.init.orthogonal_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class ResidualVQTokenizer(nn.Module):
    """Flattened action chunks ``(B, W*A)`` <-> codes ``(B, L)``."""

    def __init__(self, input_dim: int, hidden: int = 128, code_dim: int = 512, n_codes: int = 16,
                 n_layers: int = 2, ema_decay: float = 0.8, commitment_weight: float = 5.0,
                 dead_code_threshold: float = 1.0):
        super().__init__()
        if n_codes < 1 or n_layers < 1:
            raise VqbetError(f"vq.n_codes and vq.n_layers must be >= 1, got {n_codes} and {n_layers}")
        self.input_dim, self.n_codes, self.n_layers = input_dim, n_codes, n_layers
        self.encoder = _mlp([input_dim, hidden, hidden, code_dim])
        self.rvq = ResidualVQ(dim=code_dim, num_quantizers=n_layers, codebook_size=n_codes, decay=ema_decay,
                              commitment_weight=commitment_weight, threshold_ema_dead_code=dead_code_threshold,
                              rotation_trick=False)
        self.decoder = _mlp([code_dim, hidden, hidden, input_dim])

    def _flat(self, chunks: torch.Tensor) -> torch.Tensor:
        flat = chunks.reshape(chunks.shape[0], -1)
        if flat.shape[1] != self.input_dim:
            raise VqbetError(f"action chunks: expected {self.input_dim} values per chunk (W*A), got shape {tuple(chunks.shape)}")
        return flat.float()

    def code_vectors(self) -> torch.Tensor:
        """Codebooks ``(L, C, code_dim)``."""
        return self.rvq.codebooks

    @torch.no_grad()
    def encode(self, chunks: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, L)`` of chunks ``(B, W, A)`` or ``(B, W*A)``; never updates the codebooks."""
        _, codes, _ = self.rvq(self.encoder(self._flat(chunks)), freeze_codebook=True)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Flattened chunks ``(B, W*A)`` from codes ``(B, L)``: decoder(sum of the code vectors)."""
        return self.decoder(self.rvq.get_output_from_indices(codes.long()))

    @torch.no_grad()
    def reconstruct(self, chunks: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(chunks))

    def loss(self, chunks: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Phase-1 loss: L1 reconstruction + commitment (EMA codebook updates happen in train mode)."""
        flat = self._flat(chunks)
        quantized, codes, commit = self.rvq(self.encoder(flat))
        recon = F.l1_loss(self.decoder(quantized), flat)
        commit = commit.sum()
        used = (F.one_hot(codes, self.n_codes).sum(0) > 0).sum(-1)  # per layer, without a device sync
        return recon + commit, {"vq_recon_l1": recon.detach(), "vq_commit": commit.detach(),
                                **{f"vq_codes_used_l{layer}": used[layer] for layer in range(self.n_layers)}}

    @torch.no_grad()
    def stats(self, chunks: torch.Tensor) -> dict:
        """Reconstruction L1, distinct codes and perplexity per layer, distinct code tuples."""
        flat = self._flat(chunks)
        codes = self.encode(flat)
        out = {"recon_l1": float(F.l1_loss(self.decode(codes), flat))}
        for layer in range(self.n_layers):
            counts = torch.bincount(codes[:, layer], minlength=self.n_codes).float()
            p = counts[counts > 0] / counts.sum()
            out[f"codes_used_l{layer}"] = int((counts > 0).sum())
            out[f"perplexity_l{layer}"] = float(math.exp(float(-(p * p.log()).sum())))
        out["code_pairs_used"] = int(torch.unique(codes, dim=0).shape[0])
        return out
