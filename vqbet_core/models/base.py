"""The one interface that VQ-BeT and the BeT baseline both implement.

Training (``vqbet_core.train``), rollouts (``vqbet_core.agent``) and export (``vqbet_core.export``)
only talk to this interface, so both policies are treated alike.

Tensors are always in *normalized* units (see ``vqbet_core.data.normalize``):
- ``obs``     float32 ``(B, T, D)``: T = ``obs_window`` observation steps, oldest first, D = fused obs dim.
- ``goal``    float32 ``(B, G)`` or ``None``: goal vector for goal-conditioned models (one goal token).
- ``actions`` float32 ``(B, T, W, A)``: for each history step t, the action chunk a[t .. t+W-1].

Phases: phase 1 fits the action tokenizer (residual VQ-VAE for VQ-BeT, k-means bins for BeT);
phase 2 trains the GPT and heads with the tokenizer frozen.

Freezing protocol (trainer side): call ``policy.freeze_tokenizer()`` once phase 1 is done. From then on
the tokenizer modules stay in eval mode (no EMA codebook updates, no dead-code restarts) and have
``requires_grad=False``, even when the trainer calls ``policy.train()``. The flag is the persistent
buffer ``tokenizer_frozen``, so a checkpoint reloaded with ``load_state_dict`` is frozen again too.
``tokenizer_loss`` refuses to run on a frozen tokenizer.

Persistence: everything a policy needs at inference (codebooks, k-means centres, the frozen flag)
lives in ``state_dict()`` as parameters or buffers, so ``safetensors.torch.save_file(policy.state_dict())``
and ``load_state_dict`` into a freshly built policy (same cfg and dims) restore it exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Heads:
    """Deterministic outputs of the policy graph for the *last* history step (what ONNX exports).

    ``logits``: ``(B, L, C)`` code logits per tokenizer layer (L=2 for VQ-BeT, L=1 for BeT).
    ``secondary_given_primary``: ``(B, C, C)`` secondary logits conditioned on each possible primary
    code (sequential selection), or ``None``. When it is given, ``logits[:, 1]`` is the marginal
    ``log sum_p P(p) P(s | p)``, used only when sampling is asked to be non-sequential.
    ``offsets``: ``(B, L, C, W*A)`` per-layer, per-code offsets; the chunk offset is the sum over
    layers of the offsets of the chosen codes.
    ``completion``: ``(B,)`` for models with a completion head (``completion.horizon > 0``): the
    probability that the current subtask (the goal) ends within the horizon (``vqbet_core.data.tasks``).
    """

    logits: torch.Tensor
    secondary_given_primary: torch.Tensor | None
    offsets: torch.Tensor
    completion: torch.Tensor | None = None  # (B,) probability that the current subtask ends soon, or None


class Policy(nn.Module, ABC):
    kind: str = "base"

    def __init__(self, cfg: dict, obs_dim: int, action_dim: int, goal_dim: int = 0):
        super().__init__()
        self.cfg = cfg
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.goal_dim = goal_dim
        self.obs_window = int(cfg["obs_window"])
        self.action_chunk = int(cfg["action_chunk"])
        self.register_buffer("tokenizer_frozen", torch.tensor(False))
        self.completion_head: nn.Module | None = None  # built by subclasses with their GPT (_build_completion_head)
        self._frozen = False  # python mirror of the buffer: no device sync on every step
        self.register_load_state_dict_post_hook(lambda module, _keys: module._after_load())

    # ---------------------------------------------------------------- subtask completion
    def _build_completion_head(self, width: int) -> None:
        """A small MLP on the GPT feature: does the current subtask end soon? Only with ``completion.horizon > 0``.

        ``completion.obs_input``: the head also reads the step's observation and the goal. Why: the GPT's
        feature serves the actions and carries the arm's pose far more than an object's small joint change;
        a head on it alone could not tell a done subtask from an arm at its end pose with the object unmoved
        (kitchen_goal: val precision 0.73 on such windows with the GPT frozen).
        """
        ccfg = self.cfg.get("completion") or {}
        if int(ccfg.get("horizon") or 0) > 0:
            hidden = int(ccfg.get("hidden") or 128)
            self._completion_sees_obs = bool(ccfg.get("obs_input", False))
            extra = self.obs_dim + self.goal_dim if self._completion_sees_obs else 0
            self.completion_head = nn.Sequential(nn.Linear(width + extra, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def completion_parameters(self) -> list[nn.Parameter]:
        return [] if self.completion_head is None else list(self.completion_head.parameters())

    def _completion_input(self, feats: torch.Tensor, obs: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
        """The head's input: features ``(..., E)``, with ``obs_input`` also the observation ``(..., D)`` and goal."""
        if not getattr(self, "_completion_sees_obs", False):
            return feats
        parts = [feats, obs.to(feats.dtype)]
        if goal is not None and self.goal_dim:
            g = goal.to(feats.dtype)
            parts.append(g.unsqueeze(1).expand(*feats.shape[:-1], g.shape[-1]) if feats.dim() == 3 else g)
        return torch.cat(parts, dim=-1)

    def _completion(self, feat: torch.Tensor, obs: torch.Tensor | None = None,
                    goal: torch.Tensor | None = None) -> torch.Tensor | None:
        """``(B,)`` completion probability from last-step features ``(B, E)`` (and that step's obs ``(B, D)``)."""
        if self.completion_head is None:
            return None
        return torch.sigmoid(self.completion_head(self._completion_input(feat, obs, goal))).squeeze(-1)

    def _completion_loss(self, feats: torch.Tensor, done: torch.Tensor | None, finished: tuple | None = None,
                         obs: torch.Tensor | None = None, goal: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Weighted BCE of the completion head on every history step ``feats (B, T, E)`` vs ``done (B, T)``.

        ``done`` is 1 / 0, or NaN where a step belongs to another subtask than the goal (not scored).
        ``finished``: ``(obs, goal, done)`` windows past a subtask's end with it as the goal (completion.after),
        or around it with the object unmoved (completion.unmoved); run through the GPT here and scored with
        the rest - they train the head, no action loss. ``obs``/``goal``: the windows' (for ``obs_input``).
        """
        zero = torch.zeros((), device=feats.device)
        if self.completion_head is None or done is None:
            return zero, {}
        import torch.nn.functional as F

        inputs = self._completion_input(feats, obs, goal)
        if finished is not None:
            f_obs, f_goal, f_done = finished
            inputs = torch.cat([inputs, self._completion_input(self.gpt(f_obs, f_goal), f_obs, f_goal)], dim=0)
            done = torch.cat([done, f_done], dim=0)
        logits = self.completion_head(inputs).squeeze(-1)
        mask = ~torch.isnan(done)
        if not bool(mask.any()):
            return zero, {}
        target = done[mask]
        bce = F.binary_cross_entropy_with_logits(logits[mask], target)
        with torch.no_grad():
            pred = logits[mask] > 0
            pos = target > 0.5
            tp = (pred & pos).sum()
            metrics = {"completion_loss": bce.detach(),
                       "completion_recall": tp / pos.sum().clamp(min=1),
                       "completion_precision": tp / pred.sum().clamp(min=1)}
        return float(self.cfg["completion"].get("weight", 1.0)) * bce, metrics

    # ---------------------------------------------------------------- freezing
    def tokenizer_modules(self) -> list[nn.Module]:
        """Submodules that form the action tokenizer (frozen in phase 2)."""
        return []

    @property
    def is_tokenizer_frozen(self) -> bool:
        return self._frozen

    def freeze_tokenizer(self) -> None:
        """End of phase 1: tokenizer to eval mode and no gradients, for good (see module docstring)."""
        self.tokenizer_frozen.fill_(True)
        self._frozen = True
        self._apply_tokenizer_freeze()

    def _after_load(self) -> None:
        """Re-derive python-side state from loaded buffers (subclasses extend it)."""
        self._frozen = bool(self.tokenizer_frozen)
        self._apply_tokenizer_freeze()

    def _apply_tokenizer_freeze(self) -> None:
        if self._frozen:
            for module in self.tokenizer_modules():
                module.eval()
                module.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self._apply_tokenizer_freeze()
        return self

    # ---------------------------------------------------------------- phase 1
    @abstractmethod
    def fit_tokenizer_init(self, all_actions: np.ndarray, action_chunks: np.ndarray) -> None:
        """Called once before phase 1 with every normalized action ``(N, A)`` and chunk ``(N, W, A)``.

        BeT fits k-means here (its whole phase 1); VQ-BeT may use it for nothing or for code init.
        """

    @abstractmethod
    def tokenizer_loss(self, chunks: torch.Tensor) -> tuple[torch.Tensor, dict] | None:
        """Phase-1 loss on chunks ``(B, W, A)``; ``None`` when the tokenizer has no gradient training.

        Metric values (here and in ``policy_loss``) are python numbers or detached 0-dim tensors, so a
        CUDA training step needs no device sync; read them with ``float()`` when logging.
        """

    @abstractmethod
    def tokenizer_stats(self, chunks: torch.Tensor) -> dict:
        """Tokenizer quality on chunks: reconstruction error, codes used, code pairs used, perplexity."""

    def tokenizer_parameters(self):
        return []

    # ---------------------------------------------------------------- phase 2
    @abstractmethod
    def policy_loss(self, obs: torch.Tensor, goal: torch.Tensor | None, actions: torch.Tensor,
                    done: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Phase-2 loss over every history step; returns (loss, scalar metrics for logging).

        ``done (B, T)``: completion targets for the completion head (see ``_completion_loss``), or None.
        """

    @abstractmethod
    def policy_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in phase 2 (GPT + heads, never the tokenizer)."""

    @abstractmethod
    def offset_head_parameters(self) -> list[nn.Parameter]:
        """The offset head only (trained alone in the last part of phase 2, as the official code does)."""

    # ---------------------------------------------------------------- inference
    @abstractmethod
    def heads(self, obs: torch.Tensor, goal: torch.Tensor | None) -> Heads:
        """Deterministic graph: history ``(B, T, D)`` (+ goal) -> logits and offsets for the last step."""

    @abstractmethod
    def decode_table(self) -> torch.Tensor:
        """Decoded chunk for every code tuple: ``(C,)*L + (W*A,)`` i.e. ``(C, C, W*A)`` or ``(K, W*A)``.

        Runtime decoding is then ``table[codes] + sum_l offsets[l, codes[l]]`` with no network.
        """

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, goal: torch.Tensor | None, temperature: float = 1.0,
                generator: torch.Generator | None = None, sequential: bool | None = None, return_heads: bool = False):
        """Sample codes and decode: returns the normalized action chunk ``(B, W, A)`` for the last step
        (and the :class:`Heads` it came from, with ``return_heads``: the completion score lives there)."""
        from vqbet_core.models.sampling import sample_and_decode

        h = self.heads(obs, goal)
        chunk = sample_and_decode(h, self.decode_table(), self.action_chunk, self.action_dim,
                                  temperature=temperature, generator=generator,
                                  sequential=self.cfg.get("sampling", {}).get("sequential", True) if sequential is None else sequential)
        return (chunk, h) if return_heads else chunk
