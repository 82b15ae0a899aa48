"""Two-phase training: phase 1 fits the action tokenizer, phase 2 the GPT and heads; resumable.

Runs on CPU or CUDA, and data-parallel under ``torchrun`` (torch.distributed DDP: every rank draws
its own batches, gradients are averaged, rank 0 writes checkpoints and logs).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vqbet_core.errors import CheckpointError, ConfigError
from vqbet_core.train.checkpoint import (CKPT, checkpoint_exists, load_meta, load_tensors, optimizer_from_flat,
                                         save_checkpoint)
from vqbet_core.train.data import TrainingData


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is '{name}' but CUDA is not available on this machine")
    return torch.device(name)


class _LossModule(nn.Module):
    """Routes ``forward`` to a policy loss so DDP can hook the backward pass."""

    def __init__(self, policy, phase: int):
        super().__init__()
        self.policy = policy
        self.phase = phase

    def forward(self, *args):
        if self.phase == 1:
            return self.policy.tokenizer_loss(*args)
        return self.policy.policy_loss(*args)


class MetricsLog:
    """Metrics as JSON lines (always) and TensorBoard scalars (when tensorboard is installed)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("phase", "step"):
                    self.tb.add_scalar(f"phase{record['phase']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _scalars(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if torch.is_tensor(v):
            v = v.detach().float().mean().item()
        if isinstance(v, (int, float, np.floating, np.integer)):
            out[k] = float(v)
    return out


def _same_model_config(a: dict, b: dict) -> bool:
    strip = lambda c: {k: v for k, v in c.items() if k not in ("train", "eval", "name")}
    return json.dumps(strip(a), sort_keys=True) == json.dumps(strip(b), sort_keys=True)


class Trainer:
    def __init__(self, cfg: dict, data_path: str | Path, run_dir: str | Path, fresh: bool = False,
                 progress: bool = True, cache_dir: str | Path | None = None, init_from: str | Path | None = None):
        from vqbet_core.models import build_policy

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.tcfg = cfg["train"]
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and self.tcfg["device"] != "cpu" else "gloo"
            torch.distributed.init_process_group(backend)
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.device = resolve_device(self.tcfg["device"])
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        torch.manual_seed(int(self.tcfg["seed"]) + self.rank)
        self.rng = np.random.default_rng(int(self.tcfg["seed"]) + 1000 * self.rank)

        if float(self.tcfg["offset_only_after"]) == 0 and init_from is None and (fresh or not checkpoint_exists(self.run_dir)):
            raise ConfigError(f"{self.run_dir}: train.offset_only_after is 0 (the GPT never trains in phase 2): start "
                              f"from a trained run with --init-from RUN")
        self.meta = {"phase1_step": 0, "phase2_step": 0}
        normalizer = None
        resume_state = None
        weights_dir = self.run_dir  # where the starting weights come from (the run itself, or --init-from)
        if checkpoint_exists(self.run_dir) and not fresh:
            old_cfg, old_meta = load_meta(self.run_dir)
            if not _same_model_config(old_cfg, cfg):
                raise CheckpointError(f"{self.run_dir}: holds a run with a different model/data config (use --fresh to start over, or another --out)")
            from vqbet_core.data.normalize import Normalizer

            normalizer = Normalizer.from_flat({k: v.numpy() for k, v in load_tensors(self.run_dir / CKPT / "normalizer.safetensors").items()})
            self.meta.update(old_meta)
            resume_state = load_tensors(self.run_dir / CKPT / "model.safetensors", self.device)
        else:
            if init_from is not None:
                weights_dir = Path(init_from)
                normalizer, resume_state = self._init_from(weights_dir)
            if self.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)

        self.encoder = None
        if cfg["data"]["image_keys"]:
            from vqbet_core.vision.encoder import build_encoder

            enc_cfg = dict(cfg["vision"])
            if resume_state is not None and (weights_dir / CKPT / "encoder.safetensors").exists():
                enc_cfg["weights"] = str(weights_dir / CKPT / "encoder.safetensors")
            self.encoder = build_encoder(enc_cfg).to(self.device).eval()
        self.data = TrainingData(cfg, data_path, self.device, cache_dir=cache_dir, normalizer=normalizer, encoder=self.encoder,
                                 progress=self.progress)
        if resume_state is not None and self.meta.get("data_hash") not in (None, self.data.data_hash):
            raise CheckpointError(f"{self.run_dir}: was trained on other data (hash {self.meta['data_hash']}, now {self.data.data_hash}); use --fresh")
        self.policy = build_policy(cfg, self.data.obs_dim, self.data.action_dim, self.data.goal_dim).to(self.device)
        if resume_state is not None:
            if weights_dir != self.run_dir:  # --init-from: a completion head whose input changed starts fresh
                resume_state = self._fresh_completion_head(resume_state)
            try:
                self.policy.load_state_dict(resume_state)
            except RuntimeError as exc:
                raise CheckpointError(f"{weights_dir}: its weights do not fit this config and data "
                                      f"({str(exc).splitlines()[0]})") from None
        self.meta.update({
            "kind": cfg["policy"], "obs_dim": self.data.obs_dim, "action_dim": self.data.action_dim,
            "goal_dim": self.data.goal_dim, "obs_keys": list(cfg["data"]["obs_keys"]),
            "image_keys": list(cfg["data"]["image_keys"]), "action_key": cfg["data"]["action_key"],
            "goal_key": cfg["data"].get("goal_key"), "data_path": str(Path(data_path).resolve()),
            "data_hash": self.data.data_hash, "n_train_episodes": int(len(self.data.train_episodes)),
            "n_val_episodes": int(len(self.data.val_episodes)),
            # whole: the scene the demos were recorded on (env_args, ...) must reach evaluation unfiltered
            "dataset_attrs": dict(self.data.dataset_attrs),
        })
        self.log = MetricsLog(self.run_dir, self.is_main)
        resuming = resume_state is not None and weights_dir == self.run_dir
        self._opt_state = self._load_optimizer_state() if resuming else None  # --init-from: a fresh optimizer

    # ------------------------------------------------------------------ helpers
    def _init_from(self, source: Path):
        """Start phase 2 from another run's weights (tokenizer, GPT, heads) and normalizer.

        Why: a finished run's tokenizer and GPT can be reused to try another offset loss or more phase-2
        training without redoing them; ``--set train.offset_only_after=0`` then trains only the offset head.
        The data is not required to be the source's (fine-tuning on more demonstrations), but the
        normalizer stays the source's, since the weights were trained on its scale.
        """
        from vqbet_core.data.normalize import Normalizer

        if not checkpoint_exists(source):
            raise CheckpointError(f"--init-from {source}: not a run folder with a checkpoint (expected {source}/{CKPT}/meta.yaml)")
        src_cfg, src_meta = load_meta(source)
        if src_cfg.get("policy") != self.cfg["policy"]:
            raise CheckpointError(f"--init-from {source}: a {src_cfg.get('policy')!r} run, this config trains {self.cfg['policy']!r}")
        if src_meta.get("phase1_step", 0) < int(src_cfg["train"]["phase1_steps"]):
            raise CheckpointError(f"--init-from {source}: its phase 1 (tokenizer) has not finished")
        self.meta.update({"phase1_step": int(self.tcfg["phase1_steps"]), "phase2_step": 0, "init_from": str(source.resolve())})
        normalizer = Normalizer.from_flat({k: v.numpy() for k, v in load_tensors(source / CKPT / "normalizer.safetensors").items()})
        return normalizer, load_tensors(source / CKPT / "model.safetensors", self.device)

    def _fresh_completion_head(self, state: dict) -> dict:
        """The source's weights with its completion head replaced by this policy's new one when their shapes
        differ (``completion.obs_input`` changes the head's input): the GPT and action heads carry over, the
        head is trained anew. Why: a better completion head should not cost a retrained policy."""
        own = self.policy.state_dict()
        keys = [k for k in state if k.startswith("completion_head.")]
        if keys and any(k not in own or own[k].shape != state[k].shape for k in keys):
            state = {k: v for k, v in state.items() if not k.startswith("completion_head.")}
            state.update({k: v for k, v in own.items() if k.startswith("completion_head.")})
            self.meta["init_from_fresh_completion_head"] = True
        return state

    def _load_optimizer_state(self):
        ck = self.run_dir / CKPT
        if not (ck / "optimizer.yaml").exists():
            return None
        import yaml

        return load_tensors(ck / "optimizer.safetensors", self.device), yaml.safe_load((ck / "optimizer.yaml").read_text())

    def _wrap(self, phase: int) -> nn.Module:
        module = _LossModule(self.policy, phase)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
        return module

    def save(self, optimizer=None) -> None:
        if self.is_main:
            save_checkpoint(self.run_dir, self.cfg, self.meta, self.policy, self.data.normalizer, optimizer, self.encoder)

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not self.progress, dynamic_ncols=True, leave=True)

    # ------------------------------------------------------------------ phase 1
    def phase1(self) -> None:
        steps = int(self.tcfg["phase1_steps"])
        if self.meta["phase1_step"] == 0:
            all_actions, all_chunks = self.data.all_chunks()
            self.policy.fit_tokenizer_init(all_actions, all_chunks)
        params = list(self.policy.tokenizer_parameters())
        probe = self.data.chunks(self.data.train, self.rng.integers(0, len(self.data.train), size=min(4096, len(self.data.train))))
        if not params:  # BeT: k-means in fit_tokenizer_init is the whole phase 1
            self.meta["phase1_step"] = steps
            stats = _scalars(self.policy.tokenizer_stats(probe))
            self.log.write({"phase": 1, "step": steps, **stats})
            self.save()
            return
        opt = torch.optim.Adam(params, lr=float(self.tcfg["phase1_lr"]), weight_decay=1e-4)
        if self._opt_state is not None and self.meta["phase1_step"] < steps:
            optimizer_from_flat(opt, *self._opt_state)
        model = self._wrap(1)
        self.policy.train()
        bs = int(self.tcfg["phase1_batch_size"])
        bar = self._bar(steps, self.meta["phase1_step"], "phase 1 (tokenizer)")
        while self.meta["phase1_step"] < steps:
            chunks = self.data.chunks(self.data.train, self.rng.integers(0, len(self.data.train), size=bs))
            loss, metrics = model(chunks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.meta["phase1_step"] += 1
            step = self.meta["phase1_step"]
            bar.update(1)
            if step % int(self.tcfg["log_every"]) == 0 or step == steps:
                record = {"phase": 1, "step": step, "loss": float(loss.detach()), **_scalars(metrics)}
                if step % int(self.tcfg["val_every"]) == 0 or step == steps:
                    self.policy.eval()
                    with torch.no_grad():
                        record.update({f"usage_{k}": v for k, v in _scalars(self.policy.tokenizer_stats(probe)).items()})
                    self.policy.train()
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                self.log.write(record)
            if step % int(self.tcfg["ckpt_every"]) == 0:
                self.save(opt)
        bar.close()
        self.save()

    # ------------------------------------------------------------------ phase 2
    def _validate(self) -> dict:
        if self.data.val is None:
            return {}
        self.policy.eval()
        rng = np.random.default_rng(0)
        totals: dict[str, float] = {}
        n = 4
        with torch.no_grad():
            for _ in range(n):
                b = self.data.random_batch(self.data.val, int(self.tcfg["batch_size"]), rng)
                loss, metrics = self.policy.policy_loss(b.obs, b.goal, b.actions, b.done, b.finished)
                for k, v in {"loss": float(loss.detach()), **_scalars(metrics)}.items():
                    totals[f"val_{k}"] = totals.get(f"val_{k}", 0.0) + v / n
        self.policy.train()
        return totals

    def phase2(self) -> None:
        steps = int(self.tcfg["phase2_steps"])
        if hasattr(self.policy, "freeze_tokenizer"):
            self.policy.freeze_tokenizer()
        params = list(self.policy.policy_parameters())
        opt = torch.optim.AdamW(params, lr=float(self.tcfg["lr"]), weight_decay=float(self.tcfg["weight_decay"]),
                                betas=tuple(self.tcfg["betas"]))
        if self._opt_state is not None and self.meta["phase1_step"] >= int(self.tcfg["phase1_steps"]) and self.meta["phase2_step"] > 0:
            optimizer_from_flat(opt, *self._opt_state)
        switch = int(math.ceil(float(self.tcfg["offset_only_after"]) * steps))
        # the completion head keeps learning with the offsets (it reads the GPT feature, changes no action)
        offset_ids = {id(p) for p in self.policy.offset_head_parameters() + self.policy.completion_parameters()}

        def offsets_only():
            for p in params:
                if id(p) not in offset_ids:
                    p.requires_grad_(False)

        if self.meta["phase2_step"] >= switch:
            offsets_only()
        model = self._wrap(2)
        self.policy.train()
        bs = int(self.tcfg["batch_size"])
        clip = float(self.tcfg.get("grad_clip") or 0)
        bar = self._bar(steps, self.meta["phase2_step"], "phase 2 (GPT)")
        t0, seen = time.perf_counter(), 0
        while self.meta["phase2_step"] < steps:
            if self.meta["phase2_step"] == switch and switch < steps:
                offsets_only()
            b = self.data.random_batch(self.data.train, bs, self.rng)
            loss, metrics = model(b.obs, b.goal, b.actions, b.done, b.finished)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
            opt.step()
            self.meta["phase2_step"] += 1
            seen += bs
            step = self.meta["phase2_step"]
            bar.update(1)
            if step % int(self.tcfg["log_every"]) == 0 or step == steps:
                record = {"phase": 2, "step": step, "loss": float(loss.detach()), **_scalars(metrics),
                          "samples_per_s": seen * self.world / (time.perf_counter() - t0)}
                if step % int(self.tcfg["val_every"]) == 0 or step == steps:
                    record.update(self._validate())
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                self.log.write(record)
            if step % int(self.tcfg["ckpt_every"]) == 0:
                self.save(opt)
        bar.close()
        for p in params:
            p.requires_grad_(True)
        self.save()

    def run(self, phase: str = "all") -> dict:
        if phase in ("all", "1"):
            self.phase1()
        if phase in ("all", "2"):
            if self.meta["phase1_step"] < int(self.tcfg["phase1_steps"]):
                raise CheckpointError(f"{self.run_dir}: phase 1 has not finished; run --phase 1 first")
            self.phase2()
        self.log.close()
        if self.is_main:
            from vqbet_core.train.plots import plot_losses

            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        if self.world > 1:
            torch.distributed.barrier()
        return dict(self.meta)
