"""BeT baseline: k-means bins over action chunks + GPT + bin logits + per-bin offsets.

Phase 1 is k-means only (``fit_tokenizer_init``); the centres are a buffer so they travel with the
state_dict. Phase 2: focal loss on the true (nearest) bin + ``bet.offset_weight`` * MSE between the
offset predicted for the true bin and the residual ``chunk - centre``, as in the BeT code. The heads
are single linear maps of the GPT feature (BeT's minGPT head, split in two so the offset head can be
trained alone). ``bet.n_bins = 1`` makes it plain MSE regression: the baseline that averages modes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vqbet_core.errors import ConfigError, VqbetError
from vqbet_core.models.base import Heads, Policy
from vqbet_core.models.gpt import GPT
from vqbet_core.models.losses import focal_loss
from vqbet_core.models.vqbet import check_actions

KMEANS_MAX_SAMPLES = 100_000  # k-means on a fixed random subset beyond this (keeps phase 1 fast)
KMEANS_SEED = 0


class BeTPolicy(Policy):
    kind = "bet"

    def __init__(self, cfg: dict, obs_dim: int, action_dim: int, goal_dim: int = 0):
        super().__init__(cfg, obs_dim, action_dim, goal_dim)
        self.n_bins = cfg["bet"]["n_bins"]
        if not isinstance(self.n_bins, int) or self.n_bins < 1:
            raise ConfigError(f"bet.n_bins must be an integer >= 1, got {self.n_bins!r}")
        self.chunk_dim = self.action_chunk * action_dim
        gpt = cfg["gpt"]
        self.register_buffer("centers", torch.zeros(self.n_bins, self.chunk_dim))
        self.register_buffer("centers_fitted", torch.tensor(False))
        self._fitted = False  # python mirror of the buffer (no device sync per step)
        self.gpt = GPT(obs_dim, self.obs_window, int(gpt["n_layer"]), int(gpt["n_head"]), int(gpt["n_embd"]),
                       float(gpt["dropout"]), goal_dim)
        self.bin_head = nn.Linear(int(gpt["n_embd"]), self.n_bins)
        self.offset_head = nn.Linear(int(gpt["n_embd"]), self.n_bins * self.chunk_dim)
        self._build_completion_head(int(gpt["n_embd"]))

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.gpt, self.bin_head, self.offset_head) for p in m.parameters()] + self.completion_parameters()

    def offset_head_parameters(self) -> list[nn.Parameter]:
        return list(self.offset_head.parameters())

    # ---------------------------------------------------------------- phase 1
    def fit_tokenizer_init(self, all_actions: np.ndarray, action_chunks: np.ndarray) -> None:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        want = (self.action_chunk, self.action_dim)
        if np.ndim(action_chunks) != 3 or tuple(np.shape(action_chunks)[1:]) != want:
            raise VqbetError(f"action chunks: expected shape (N, {want[0]}, {want[1]}), got {np.shape(action_chunks)}")
        flat = np.asarray(action_chunks, np.float64).reshape(len(action_chunks), -1)
        if len(flat) < self.n_bins:
            raise VqbetError(f"action chunks: k-means with bet.n_bins={self.n_bins} needs at least that many chunks, got {len(flat)}")
        if len(flat) > KMEANS_MAX_SAMPLES:
            flat = flat[np.random.default_rng(KMEANS_SEED).choice(len(flat), KMEANS_MAX_SAMPLES, replace=False)]
        # as many threads as torch uses: sklearn's default (all cores) is many times slower on a busy machine
        with threadpool_limits(torch.get_num_threads()):
            km = KMeans(n_clusters=self.n_bins, random_state=KMEANS_SEED, n_init=1).fit(flat)
        self.centers.copy_(torch.as_tensor(km.cluster_centers_, dtype=self.centers.dtype))
        self.centers_fitted.fill_(True)
        self._fitted = True

    def _after_load(self) -> None:
        super()._after_load()
        self._fitted = bool(self.centers_fitted)

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise VqbetError("BeT policy: k-means bins are not fitted; run phase 1 (fit_tokenizer_init) first")

    def nearest_bin(self, chunks: torch.Tensor) -> torch.Tensor:
        """Index of the closest centre for each chunk ``(N, W, A)`` or ``(N, W*A)``."""
        self._require_fitted()
        flat = chunks.reshape(chunks.shape[0], -1).float()
        return torch.cdist(flat, self.centers).argmin(-1)

    def tokenizer_loss(self, chunks: torch.Tensor):
        return None

    @torch.no_grad()
    def tokenizer_stats(self, chunks: torch.Tensor) -> dict:
        flat = chunks.reshape(chunks.shape[0], -1).float()
        bins = self.nearest_bin(flat)
        counts = torch.bincount(bins, minlength=self.n_bins).float()
        p = counts[counts > 0] / counts.sum()
        used = int((counts > 0).sum())
        return {"recon_l1": float(F.l1_loss(self.centers[bins], flat)), "codes_used_l0": used,
                "perplexity_l0": float(math.exp(float(-(p * p.log()).sum()))), "code_pairs_used": used}

    # ---------------------------------------------------------------- heads
    def _outputs(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bin_head(feats), self.offset_head(feats).reshape(feats.shape[0], self.n_bins, self.chunk_dim)

    def heads(self, obs: torch.Tensor, goal: torch.Tensor | None) -> Heads:
        feat = self.gpt(obs, goal)[:, -1]
        logits, offsets = self._outputs(feat)
        return Heads(logits.unsqueeze(1), None, offsets.unsqueeze(1), self._completion(feat, obs[:, -1], goal))

    @torch.no_grad()
    def decode_table(self) -> torch.Tensor:
        self._require_fitted()
        return self.centers.clone()

    # ---------------------------------------------------------------- phase 2
    def policy_loss(self, obs: torch.Tensor, goal: torch.Tensor | None, actions: torch.Tensor,
                    done: torch.Tensor | None = None, finished: tuple | None = None) -> tuple[torch.Tensor, dict]:
        check_actions(actions, obs, self.action_chunk, self.action_dim)
        feats = self.gpt(obs, goal)
        completion_loss, completion_metrics = self._completion_loss(feats, done, finished, obs, goal)
        logits, offsets = self._outputs(feats.reshape(-1, feats.shape[-1]))
        chunks = actions.reshape(-1, self.chunk_dim).float()
        true = self.nearest_bin(chunks)
        rows = torch.arange(len(true), device=true.device)
        bin_loss = focal_loss(logits, true, float(self.cfg["loss"]["focal_gamma"]))
        offset_loss = F.mse_loss(offsets[rows, true], chunks - self.centers[true])
        loss = bin_loss + float(self.cfg["bet"]["offset_weight"]) * offset_loss + completion_loss
        with torch.no_grad():
            best = logits.argmax(-1)
            metrics = {"bin_loss": bin_loss.detach(), "offset_loss": offset_loss.detach(),
                       "bin_acc": (best == true).float().mean(),
                       "action_l1_argmax": F.l1_loss(self.centers[best] + offsets[rows, best], chunks),
                       **completion_metrics}
        return loss, metrics
