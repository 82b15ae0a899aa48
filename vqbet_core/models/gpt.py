"""Causal transformer backbone shared by VQ-BeT and BeT (nanoGPT style: pre-LayerNorm blocks, GELU MLP).

One token per observation step (a linear projection of the fused observation vector) plus a learned
position embedding; a goal-conditioned model prepends one goal token, so every step attends to the
goal. Attention is written out with an explicit causal mask (no fused kernel) so the graph exports to
ONNX with either exporter and runs the same on CPU and CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqbet_core.errors import VqbetError


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, block_size: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)
        # constant, rebuilt from the config: not part of the state_dict
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = self.qkv(x).split(E, dim=2)
        q, k, v = (t.view(B, T, self.n_head, E // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
        att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, E)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, block_size: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, block_size)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """History ``(B, T, D)`` (+ goal ``(B, G)``) -> one feature per observation step ``(B, T, n_embd)``."""

    def __init__(self, obs_dim: int, obs_window: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float, goal_dim: int = 0):
        super().__init__()
        if n_embd % n_head:
            raise VqbetError(f"gpt.n_embd ({n_embd}) must be divisible by gpt.n_head ({n_head})")
        self.obs_dim = obs_dim
        self.goal_dim = goal_dim
        self.obs_window = obs_window
        self.n_goal_tokens = 1 if goal_dim > 0 else 0
        block_size = obs_window + self.n_goal_tokens
        self.obs_proj = nn.Linear(obs_dim, n_embd)
        self.goal_proj = nn.Linear(goal_dim, n_embd) if goal_dim > 0 else None
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * max(n_layer, 1)))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def check_inputs(self, obs: torch.Tensor, goal: torch.Tensor | None) -> None:
        if obs.dim() != 3 or obs.shape[-1] != self.obs_dim:
            raise VqbetError(f"obs: expected shape (batch, T, {self.obs_dim}), got {tuple(obs.shape)}")
        if not 1 <= obs.shape[1] <= self.obs_window:
            raise VqbetError(f"obs: history length {obs.shape[1]} must be between 1 and obs_window={self.obs_window}")
        if self.goal_dim > 0:
            if goal is None or goal.dim() != 2 or goal.shape[-1] != self.goal_dim:
                got = None if goal is None else tuple(goal.shape)
                raise VqbetError(f"goal: this model is goal-conditioned, expected shape (batch, {self.goal_dim}), got {got}")
        elif goal is not None:
            raise VqbetError(f"goal: this model is not goal-conditioned (goal_dim=0), got a goal of shape {tuple(goal.shape)}")

    def forward(self, obs: torch.Tensor, goal: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(obs, goal)
        tokens = self.obs_proj(obs)
        if self.goal_proj is not None:
            tokens = torch.cat([self.goal_proj(goal).unsqueeze(1), tokens], dim=1)
        x = self.drop(tokens + self.pos_emb[:, : tokens.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)[:, self.n_goal_tokens:]
