"""Project-made ResNet-18 weights: supervised pretraining on simulator frames labelled with the true scene state.

Why: VQ-BeT's image tasks use a frozen, ImageNet-pretrained ResNet-18, and a machine that cannot
download those weights is left with a randomly initialised trunk whose global-average-pooled
features say little about *where* things are. A simulator knows the scene state behind every frame
(the PushT block's pose, the pusher's position), so the trunk can learn to read it: random scenes
are rendered, a linear head on the pooled 512-d feature regresses the state, and only the trunk is
kept. The policy then sees features from which the scene state is linearly decodable by
construction. The result is a ``vision.weights`` file like any other (``.safetensors``).

Frames come from the env's optional pretraining protocol (``SimEnv.pretrain_labels`` /
``pretrain_scene`` / ``random_action``): each reset draws a random scene (the env may randomise it
further, e.g. the kitchen's doors and knobs), then a few random actions move it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from vqbet_core.errors import VqbetError
from vqbet_core.vision.encoder import ImageEncoder, load_encoder_state
from vqbet_core.vision.preprocess import ImagePreprocess


def check_pretrainable(env) -> str:
    """The env's camera key; a one-line error when the env cannot label frames or has no camera."""
    if not env.pretrain_label_names:
        raise VqbetError(f"env '{env.name}' cannot label frames for encoder pretraining (it defines no pretrain_label_names)")
    if not env.image_keys:
        raise VqbetError(f"env '{env.name}' emits no camera images to pretrain an encoder on")
    return env.image_keys[0]


def collect_frames(env, n_frames: int, seed: int = 0, frames_per_reset: int = 5, steps_between: int = 3,
                   progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n_frames`` camera frames ``(N, H, W, 3)`` uint8 and their labels ``(N, L)`` float32 from random scenes.

    Each reset (seed drawn from ``seed``'s generator) contributes ``frames_per_reset`` frames: the
    reset frame, then one after every ``steps_between`` steps towards a new random action.
    """
    if n_frames < 1 or frames_per_reset < 1 or steps_between < 1:
        raise VqbetError(f"collect_frames: n_frames ({n_frames}), frames_per_reset ({frames_per_reset}) and "
                         f"steps_between ({steps_between}) must be >= 1")
    camera = check_pretrainable(env)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_frames, desc=progress, unit="frame", leave=False)
    while len(images) < n_frames:
        obs = env.reset(seed=int(rng.integers(2**31 - 1)))
        obs = env.pretrain_scene(rng) or obs
        for k in range(frames_per_reset):
            if k:
                action = env.random_action(rng)
                done = False
                for _ in range(steps_between):
                    obs, done = env.step(action)
                    if done:
                        break
                if done:
                    break
            images.append(np.asarray(obs[camera], dtype=np.uint8))
            labels.append(np.asarray(env.pretrain_labels(), dtype=np.float32))
            if bar is not None:
                bar.update(1)
            if len(images) >= n_frames:
                break
    if bar is not None:
        bar.close()
    return np.stack(images), np.stack(labels)


def linear_probe_r2(encoder: ImageEncoder, images: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                    val_idx: np.ndarray, ridge: float = 1e-2) -> float:
    """R^2 on ``val_idx`` of a ridge regression from the encoder's pooled features to ``labels``, fitted on ``train_idx``.

    How much of the scene state a policy could read from the features with one linear layer: the
    yardstick for comparing trunks (pretrained vs randomly initialised)."""
    pre = ImagePreprocess(size=(images.shape[2], images.shape[1]))
    feats = encoder.encode(images[np.concatenate([train_idx, val_idx])], pre).astype(np.float64)
    feats = np.concatenate([feats, np.ones((len(feats), 1))], 1)
    a, b = feats[: len(train_idx)], feats[len(train_idx) :]
    y_train, y_val = labels[train_idx].astype(np.float64), labels[val_idx].astype(np.float64)
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ y_train)
    err = b @ w - y_val
    return float(1.0 - (err**2).sum() / max(((y_val - y_train.mean(0)) ** 2).sum(), 1e-12))


def pretrain_encoder(images: np.ndarray, labels: np.ndarray, steps: int, batch_size: int = 32, lr: float = 1e-3,
                     val_fraction: float = 0.05, seed: int = 0, label_names: list[str] | None = None,
                     progress: str | None = None, probe_frames: int = 2000) -> tuple[ImageEncoder, dict]:
    """Train ResNet-18 (+ a linear head) to regress ``labels`` from ``images``; returns the trunk and metrics.

    Metrics are on a held-out ``val_fraction`` of the frames: the RMSE per label, the RMSE of always
    predicting the training mean, and R^2 (1 = perfect, 0 = no better than the mean); and the R^2 of a
    linear probe (fitted on up to ``probe_frames`` training frames) on this trunk's features and on the
    randomly initialised trunk's (``vision.weights: none``), which is what pretraining buys.
    """
    from torchvision.models import resnet18

    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise VqbetError(f"pretraining images must be RGB uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.ndim != 2 or len(labels) != len(images):
        raise VqbetError(f"pretraining labels must be (N, L) with N = {len(images)} frames, got {labels.shape}")
    if steps < 1 or batch_size < 1 or not 0 < val_fraction < 1:
        raise VqbetError(f"pretraining needs steps >= 1, batch_size >= 1 and 0 < val_fraction < 1, "
                         f"got {steps}, {batch_size}, {val_fraction}")
    n_val = max(1, int(round(len(images) * val_fraction)))
    if len(images) - n_val < 2:
        raise VqbetError(f"pretraining needs at least {n_val + 2} frames, got {len(images)}")
    names = list(label_names or [f"label_{i}" for i in range(labels.shape[1])])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]
    pre = ImagePreprocess(size=(images.shape[2], images.shape[1]))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = resnet18(weights=None, num_classes=labels.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    y_all = torch.from_numpy(labels)
    net.train()
    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=progress, unit="step", leave=False)
    losses = []
    for step in it:
        idx = train_idx[rng.integers(len(train_idx), size=batch_size)]
        x = torch.from_numpy(pre.to_model_input(images[idx]))
        loss = F.mse_loss(net(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and step % 20 == 0:
            it.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")

    net.eval()
    encoder = ImageEncoder()
    load_encoder_state(encoder, net.state_dict(), "pretrained ResNet-18")
    encoder.train(False)
    # held-out predictions go through the kept trunk, exactly as the policy will see its features
    with torch.no_grad():
        pred = net.fc(torch.from_numpy(encoder.encode(images[val_idx], pre))).numpy()
    err = pred - labels[val_idx]
    mean_err = labels[train_idx].mean(0) - labels[val_idx]
    rmse = np.sqrt((err**2).mean(0))
    rmse_mean = np.sqrt((mean_err**2).mean(0))
    metrics = {
        "frames": int(len(images)), "val_frames": int(n_val), "steps": int(steps), "batch_size": int(batch_size),
        "train_loss_last100": round(float(np.mean(losses[-100:])), 5),
        "val_rmse": {n: round(float(v), 4) for n, v in zip(names, rmse)},
        "val_rmse_mean_predictor": {n: round(float(v), 4) for n, v in zip(names, rmse_mean)},
        "val_r2": round(float(1.0 - (err**2).sum() / max((mean_err**2).sum(), 1e-12)), 4),
    }
    probe_idx = train_idx[:probe_frames]
    metrics["probe_frames"] = int(len(probe_idx))
    metrics["val_r2_linear_probe"] = round(linear_probe_r2(encoder, images, labels, probe_idx, val_idx), 4)
    metrics["val_r2_linear_probe_random_trunk"] = round(
        linear_probe_r2(ImageEncoder().train(False), images, labels, probe_idx, val_idx), 4)
    return encoder, metrics
