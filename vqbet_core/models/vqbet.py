"""VQ-BeT policy: residual-VQ action tokenizer + GPT + code head + per-code offset head.

Phase 1 trains the tokenizer (``tokenizer_loss``). Phase 2 (``policy_loss``) predicts, for every
history step, the L codes of the action chunk starting there (focal loss against the codes of the
frozen tokenizer) and per-layer, per-code offsets; the predicted chunk is
``decoder(sum of code vectors) + sum_l offsets[l, code_l]``.

With ``sampling.sequential`` the secondary code is predicted given the primary (its head also sees a
one-hot of the primary: the true one in training). ``heads()`` then evaluates the secondary head for
every possible primary, ``secondary_given_primary (B, C, C)``, so the exported graph needs no sampling
inside it; ``logits[:, 1]`` holds the marginal ``log sum_p P(p) P(s | p)`` for non-sequential sampling.

``loss.offset_codes`` chooses which codes the offset loss decodes: ``"sampled"`` (the official code:
codes sampled from the predicted logits, so offsets learn to correct the policy's own code choices),
``"true"`` (the tokenizer's codes of the target chunk, as BeT trains its bin offsets) or ``"true_primary"``
(the true primary code, the secondary sampled given it) or ``"both"`` (the mean of the "true" and "sampled"
losses). Why not always "sampled": where the observation does not tell the mode, an L1 loss on sampled codes
pulls every code's offset towards the median of the modes - the majority mode - so a sampled minority code
decodes into a majority action (measured at the multipath fork: minority-route codes at 0.40 probability gave
minority-route chunks 0.10 of the time). Why not always "true": a code the policy samples where it was never
the true one (a neighbour at a code boundary) gets an offset nothing trained, and decodes into a jerk. "both"
trains every sampled code to land on the demonstrated action while keeping each true code's own offset.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vqbet_core.errors import ConfigError, VqbetError
from vqbet_core.models.base import Heads, Policy
from vqbet_core.models.gpt import GPT
from vqbet_core.models.losses import focal_loss
from vqbet_core.models.rvq import ResidualVQTokenizer

OFFSET_CODES = ("sampled", "true", "true_primary", "both")


def head_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Two hidden ReLU layers, as the official code and offset heads."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


def check_actions(actions: torch.Tensor, obs: torch.Tensor, chunk: int, action_dim: int) -> None:
    want = (obs.shape[0], obs.shape[1], chunk, action_dim)
    if tuple(actions.shape) != want:
        raise VqbetError(f"actions: expected shape (B, T, W, A) = {want}, got {tuple(actions.shape)}")


class VQBeTPolicy(Policy):
    kind = "vqbet"

    def __init__(self, cfg: dict, obs_dim: int, action_dim: int, goal_dim: int = 0):
        super().__init__(cfg, obs_dim, action_dim, goal_dim)
        vq, gpt, loss = cfg["vq"], cfg["gpt"], cfg["loss"]
        self.n_codes, self.n_layers = int(vq["n_codes"]), int(vq["n_layers"])
        self.chunk_dim = self.action_chunk * action_dim
        self.offset_codes = loss.get("offset_codes", "sampled")
        if self.offset_codes is True:  # `--set loss.offset_codes=true` parses as a YAML boolean
            self.offset_codes = "true"
        if self.offset_codes not in OFFSET_CODES:
            raise ConfigError(f"loss.offset_codes must be one of {OFFSET_CODES}, got {self.offset_codes!r}")
        self.sequential = bool(cfg.get("sampling", {}).get("sequential", True)) and self.n_layers >= 2
        self.tokenizer = ResidualVQTokenizer(self.chunk_dim, hidden=int(vq["hidden"]), code_dim=int(vq["code_dim"]),
                                             n_codes=self.n_codes, n_layers=self.n_layers,
                                             ema_decay=float(vq["ema_decay"]), commitment_weight=float(vq["commitment_weight"]),
                                             dead_code_threshold=float(vq["dead_code_threshold"]))
        self.gpt = GPT(obs_dim, self.obs_window, int(gpt["n_layer"]), int(gpt["n_head"]), int(gpt["n_embd"]),
                       float(gpt["dropout"]), goal_dim)
        width, hidden, C, L = int(gpt["n_embd"]), int(cfg["heads"]["hidden"]), self.n_codes, self.n_layers
        if self.sequential:
            self.primary_head = head_mlp(width, hidden, C)
            self.secondary_head = head_mlp(width + C, hidden, C)
            self.rest_head = head_mlp(width, hidden, (L - 2) * C) if L > 2 else None
        else:
            self.code_head = head_mlp(width, hidden, L * C)
        self.offset_head = head_mlp(width, hidden, L * C * self.chunk_dim)
        self._build_completion_head(width)

    # ---------------------------------------------------------------- parts
    def tokenizer_modules(self) -> list[nn.Module]:
        return [self.tokenizer]

    def tokenizer_parameters(self):
        return list(self.tokenizer.parameters())

    def _code_heads(self) -> list[nn.Module]:
        if self.sequential:
            return [self.primary_head, self.secondary_head] + ([self.rest_head] if self.rest_head is not None else [])
        return [self.code_head]

    def policy_parameters(self) -> list[nn.Parameter]:
        modules = [self.gpt, *self._code_heads(), self.offset_head]
        return [p for m in modules for p in m.parameters()] + self.completion_parameters()

    def offset_head_parameters(self) -> list[nn.Parameter]:
        return list(self.offset_head.parameters())

    # ---------------------------------------------------------------- phase 1
    def fit_tokenizer_init(self, all_actions: np.ndarray, action_chunks: np.ndarray) -> None:
        """Only checks the data: like the official code, codebooks start random (dead codes get restarted)."""
        want = (self.action_chunk, self.action_dim)
        if np.ndim(action_chunks) != 3 or tuple(np.shape(action_chunks)[1:]) != want or len(action_chunks) == 0:
            raise VqbetError(f"action chunks: expected shape (N>0, {want[0]}, {want[1]}), got {np.shape(action_chunks)}")

    def tokenizer_loss(self, chunks: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.is_tokenizer_frozen:
            raise VqbetError("tokenizer_loss: the tokenizer is frozen (phase 2); phase-1 training must come first")
        return self.tokenizer.loss(chunks)

    def tokenizer_stats(self, chunks: torch.Tensor) -> dict:
        return self.tokenizer.stats(chunks)

    # ---------------------------------------------------------------- heads
    def _layer_logits(self, feats: torch.Tensor, primary: torch.Tensor | None) -> torch.Tensor:
        """Logits ``(N, L, C)``; when sequential the secondary is conditioned on ``primary (N,)``."""
        n, C, L = feats.shape[0], self.n_codes, self.n_layers
        if not self.sequential:
            return self.code_head(feats).reshape(n, L, C)
        first = self.primary_head(feats)
        second = self.secondary_head(torch.cat([feats, F.one_hot(primary, C).to(feats.dtype)], dim=-1))
        parts = [first.unsqueeze(1), second.unsqueeze(1)]
        if self.rest_head is not None:
            parts.append(self.rest_head(feats).reshape(n, L - 2, C))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def _choose(self, feats: torch.Tensor, logits: torch.Tensor, sample: bool,
                primary: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``(N, L)`` the policy itself picks (temperature-1 samples or argmax) from ``logits (N, L, C)``.

        When sequential, ``logits[:, 1]`` were computed for some other primary (teacher forcing), so the
        secondary is re-predicted given the primary just picked; the other layers reuse ``logits``.
        """
        def pick(rows):
            flat = rows.reshape(-1, self.n_codes)
            out = torch.multinomial(torch.softmax(flat, -1), 1).squeeze(-1) if sample else flat.argmax(-1)
            return out.reshape(rows.shape[:-1])

        codes = pick(logits.detach())
        if primary is not None:
            codes[:, 0] = primary
        if self.sequential:
            onehot = F.one_hot(codes[:, 0], self.n_codes).to(feats.dtype)
            codes[:, 1] = pick(self.secondary_head(torch.cat([feats.detach(), onehot], dim=-1)))
        return codes

    def _offsets(self, feats: torch.Tensor) -> torch.Tensor:
        return self.offset_head(feats).reshape(feats.shape[0], self.n_layers, self.n_codes, self.chunk_dim)

    def _decode(self, offsets: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``decoder(codes) + sum_l offsets[l, code_l]`` as ``(N, W*A)``; gradients reach the offsets only."""
        with torch.no_grad():
            base = self.tokenizer.decode(codes)
        rows = torch.arange(codes.shape[0], device=codes.device).unsqueeze(1)
        layers = torch.arange(self.n_layers, device=codes.device).unsqueeze(0)
        return base + offsets[rows, layers, codes].sum(1)

    def heads(self, obs: torch.Tensor, goal: torch.Tensor | None) -> Heads:
        feat = self.gpt(obs, goal)[:, -1]
        batch, C = feat.shape[0], self.n_codes
        offsets = self._offsets(feat)
        completion = self._completion(feat, obs[:, -1], goal)
        if not self.sequential:
            return Heads(self.code_head(feat).reshape(batch, self.n_layers, C), None, offsets, completion)
        first = self.primary_head(feat)
        onehots = torch.eye(C, device=feat.device, dtype=feat.dtype).unsqueeze(0).expand(batch, C, C)
        given = self.secondary_head(torch.cat([feat.unsqueeze(1).expand(batch, C, feat.shape[-1]), onehots], dim=-1))
        marginal = torch.logsumexp(F.log_softmax(first, -1).unsqueeze(-1) + F.log_softmax(given, -1), dim=1)
        parts = [first.unsqueeze(1), marginal.unsqueeze(1)]
        if self.rest_head is not None:
            parts.append(self.rest_head(feat).reshape(batch, self.n_layers - 2, C))
        return Heads(torch.cat(parts, dim=1), given, offsets, completion)

    @torch.no_grad()
    def decode_table(self) -> torch.Tensor:
        C, L = self.n_codes, self.n_layers
        device = self.tokenizer.code_vectors().device
        grid = torch.cartesian_prod(*[torch.arange(C, device=device)] * L).reshape(C ** L, L)
        return self.tokenizer.decode(grid).reshape((C,) * L + (self.chunk_dim,))

    # ---------------------------------------------------------------- phase 2
    def policy_loss(self, obs: torch.Tensor, goal: torch.Tensor | None, actions: torch.Tensor,
                    done: torch.Tensor | None = None, finished: tuple | None = None) -> tuple[torch.Tensor, dict]:
        check_actions(actions, obs, self.action_chunk, self.action_dim)
        w = self.cfg["loss"]
        gamma = float(w["focal_gamma"])
        feats = self.gpt(obs, goal)
        completion_loss, completion_metrics = self._completion_loss(feats, done, finished, obs, goal)
        feats = feats.reshape(-1, feats.shape[-1])
        chunks = actions.reshape(-1, self.chunk_dim).float()
        true = self.tokenizer.encode(chunks)
        logits = self._layer_logits(feats, true[:, 0])
        primary_loss = focal_loss(logits[:, 0], true[:, 0], gamma)
        secondary_loss = (focal_loss(logits[:, 1:].reshape(-1, self.n_codes), true[:, 1:].reshape(-1), gamma)
                          if self.n_layers > 1 else torch.zeros((), device=feats.device))
        offsets = self._offsets(feats)
        if self.offset_codes == "true":
            offset_loss = F.l1_loss(self._decode(offsets, true), chunks)
        else:
            given = true[:, 0] if self.offset_codes == "true_primary" else None
            sampled = self._choose(feats, logits, sample=True, primary=given)
            offset_loss = F.l1_loss(self._decode(offsets, sampled), chunks)
            if self.offset_codes == "both":
                offset_loss = 0.5 * (offset_loss + F.l1_loss(self._decode(offsets, true), chunks))
        loss = float(w["primary"]) * primary_loss + float(w["secondary"]) * secondary_loss + float(w["offset"]) * offset_loss + completion_loss
        with torch.no_grad():
            best = self._choose(feats, logits, sample=False)
            metrics = {
                "primary_loss": primary_loss.detach(), "secondary_loss": secondary_loss.detach(),
                "offset_loss": offset_loss.detach(),
                "primary_acc": (best[:, 0] == true[:, 0]).float().mean(),
                "pair_acc": (best == true).all(dim=1).float().mean(),
                "action_l1_argmax": F.l1_loss(self._decode(offsets, best), chunks),
                **completion_metrics,
            }
        return loss, metrics
