"""Focal loss (Lin et al. 2017) for the code / bin classifiers, as BeT and VQ-BeT use it.

``FL = -(1 - p_t)^gamma * log p_t``: confident, correct predictions are down-weighted so the rare
modes of multimodal demonstrations keep a share of the gradient. ``gamma = 0`` is cross entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean focal loss of ``logits (N, C)`` against integer classes ``target (N,)``."""
    logp_t = F.log_softmax(logits, dim=-1).gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    if gamma == 0:
        return -logp_t.mean()
    weight = (1.0 - logp_t.exp()).clamp(min=0.0).pow(gamma)
    return -(weight * logp_t).mean()
