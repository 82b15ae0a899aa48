"""``vqbet bench``: machine-readable speed figures (one JSON line each).

- ``train``: phase-2 training throughput (samples/s) for a stated model size, on synthetic data.
- ``policy``: per-stage step latency of an exported model in onnxruntime vs torch eager.
- ``recorder`` / ``bag2zarr``: recording and bag-conversion throughput.
- ``ros``: image published -> trajectory received latency through the policy node.
"""

from __future__ import annotations

import argparse
import importlib
import json

OTHER = {
    "policy": "vqbet_core.runtime.bench",
    "recorder": "vqbet_core.recording.bench",
    "bag2zarr": "vqbet_core.recording.bench",
    "ros": "vqbet_ros.bench_ros",
}


def add_arguments(p) -> None:
    p.add_argument("what", choices=["train", *OTHER], help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (vqbet bench WHAT --help)")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqbet bench train", description="phase-2 training throughput on synthetic data")
    p.add_argument("--policy", choices=["vqbet", "bet"], default="vqbet")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--obs-dim", type=int, default=60, help="observation dim (60 = Kitchen state)")
    p.add_argument("--action-dim", type=int, default=9)
    p.add_argument("--window", type=int, default=10, help="observation window T")
    p.add_argument("--chunk", type=int, default=1, help="action chunk W")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--width", type=int, default=120)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def bench_train(args) -> dict:
    import time

    import numpy as np
    import torch

    from vqbet_core.config import DEFAULTS, deep_merge
    from vqbet_core.models import build_policy
    from vqbet_core.train.trainer import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = deep_merge(DEFAULTS, {"policy": args.policy, "obs_window": args.window, "action_chunk": args.chunk,
                                "gpt": {"n_layer": args.layers, "n_head": args.heads, "n_embd": args.width}})
    torch.manual_seed(0)
    policy = build_policy(cfg, args.obs_dim, args.action_dim).to(device)
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((4096, args.action_dim)).astype(np.float32)
    chunks = rng.standard_normal((4096, args.chunk, args.action_dim)).astype(np.float32)
    policy.fit_tokenizer_init(acts, chunks)
    if hasattr(policy, "freeze_tokenizer"):
        policy.freeze_tokenizer()
    params = policy.policy_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    B, T, W, A = args.batch_size, args.window, args.chunk, args.action_dim
    obs = torch.randn(B, T, args.obs_dim, device=device)
    actions = torch.randn(B, T, W, A, device=device)
    policy.train()

    def step():
        loss, _ = policy.policy_loss(obs, None, actions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in params)
    return {"bench": "train", "phase": 2, "policy": args.policy, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "gpt": f"{args.layers}L/{args.heads}H/{args.width}",
            "params": n_params, "batch_size": B, "obs_window": T, "action_chunk": W,
            "steps": args.steps, "step_ms": 1000 * dt / args.steps, "samples_per_s": B * args.steps / dt}


def run(args) -> int:
    rest = [a for a in args.rest if a != "--"]
    if args.what == "train":
        print(json.dumps(bench_train(train_parser().parse_args(rest))))
        return 0
    from vqbet_core.errors import VqbetError

    try:
        module = importlib.import_module(OTHER[args.what])
    except ModuleNotFoundError as exc:
        raise VqbetError(f"benchmark '{args.what}' is not available ({exc.name} is not installed)") from None
    argv = ([args.what] if OTHER[args.what].endswith("recording.bench") else []) + rest
    return int(module.main(argv) or 0)
