"""Checkpoints as safetensors + YAML, never pickle: loading a checkpoint cannot execute code.

Layout of a run folder::

    RUN/config.yaml                    resolved training config
    RUN/checkpoint/meta.yaml           dims, keys, progress (phase steps), data hash, dataset attrs, versions
    RUN/checkpoint/model.safetensors   policy state_dict
    RUN/checkpoint/normalizer.safetensors
    RUN/checkpoint/encoder.safetensors image encoder weights (image models only)
    RUN/checkpoint/optimizer.safetensors + optimizer.yaml   optimizer state (tensors / structure) for resuming
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from vqbet_core import __version__
from vqbet_core.data.normalize import Normalizer
from vqbet_core.errors import CheckpointError

CKPT = "checkpoint"


def versions() -> dict:
    import onnxruntime
    import zarr

    return {"vqbet": __version__, "torch": str(torch.__version__), "zarr": str(zarr.__version__),
            "onnxruntime": str(onnxruntime.__version__), "python": platform.python_version()}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save_tensors(tensors: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (safetensors) and plain structure (YAML)."""
    sd = opt.state_dict()
    tensors, structure = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, state in sd["state"].items():
        entry = {}
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
                entry[name] = "tensor"
            else:
                entry[name] = value
        structure["state"][int(pid)] = entry
    return tensors, structure


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, structure: dict) -> None:
    state = {}
    for pid, entry in structure["state"].items():
        state[int(pid)] = {name: (tensors[f"{pid}.{name}"] if value == "tensor" else value) for name, value in entry.items()}
    opt.load_state_dict({"state": state, "param_groups": structure["param_groups"]})


def save_checkpoint(run_dir: Path, cfg: dict, meta: dict, policy: torch.nn.Module, normalizer: Normalizer,
                    optimizer: torch.optim.Optimizer | None = None, encoder: torch.nn.Module | None = None) -> None:
    """Write every file, then meta.yaml last: a checkpoint whose meta.yaml exists is complete."""
    run_dir = Path(run_dir)
    ck = run_dir / CKPT
    ck.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    _atomic_save_tensors(policy.state_dict(), ck / "model.safetensors")
    _atomic_save_tensors({k: torch.from_numpy(np.asarray(v)) for k, v in normalizer.to_flat().items()}, ck / "normalizer.safetensors")
    if encoder is not None:
        _atomic_save_tensors(encoder.state_dict(), ck / "encoder.safetensors")
    if optimizer is not None:
        tensors, structure = optimizer_to_flat(optimizer)
        _atomic_save_tensors(tensors, ck / "optimizer.safetensors")
        _atomic_write_text(ck / "optimizer.yaml", yaml.safe_dump(structure, sort_keys=False))
    elif (ck / "optimizer.yaml").exists():
        (ck / "optimizer.yaml").unlink()
    _atomic_write_text(ck / "meta.yaml", yaml.safe_dump({**meta, "versions": versions()}, sort_keys=False))


def checkpoint_exists(run_dir: Path) -> bool:
    return (Path(run_dir) / CKPT / "meta.yaml").exists()


def load_meta(run_dir: Path) -> tuple[dict, dict]:
    """(config, meta) of a run folder, with one-line errors for missing / broken files."""
    run_dir = Path(run_dir)
    ck = run_dir / CKPT
    for f in (run_dir / "config.yaml", ck / "meta.yaml", ck / "model.safetensors", ck / "normalizer.safetensors"):
        if not f.exists():
            raise CheckpointError(f"{run_dir}: not a checkpoint folder (missing {f.relative_to(run_dir)})")
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        meta = yaml.safe_load((ck / "meta.yaml").read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{run_dir}: unreadable YAML ({str(exc).splitlines()[0]})") from None
    return cfg, meta


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict:
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None


def load_policy(run_dir: Path, device: str | torch.device = "cpu"):
    """Rebuild the policy from a run folder: returns (policy, normalizer, cfg, meta, encoder or None)."""
    from vqbet_core.models import build_policy

    run_dir = Path(run_dir)
    cfg, meta = load_meta(run_dir)
    policy = build_policy(cfg, meta["obs_dim"], meta["action_dim"], meta.get("goal_dim", 0))
    state = load_tensors(run_dir / CKPT / "model.safetensors", device)
    try:
        policy.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{run_dir}: model weights do not match the config ({str(exc).splitlines()[0]})") from None
    policy.to(device).eval()
    normalizer = Normalizer.from_flat({k: v.cpu().numpy() for k, v in load_tensors(run_dir / CKPT / "normalizer.safetensors").items()})
    encoder = None
    if cfg["data"]["image_keys"]:
        from vqbet_core.vision.encoder import build_encoder

        encoder = build_encoder({**cfg["vision"], "weights": str(run_dir / CKPT / "encoder.safetensors")}).to(device).eval()
    return policy, normalizer, cfg, meta, encoder
