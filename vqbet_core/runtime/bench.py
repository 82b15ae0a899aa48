"""``vqbet bench policy --model DIR``: per-stage step latency of the runtime vs the same model in torch eager.

One control step = observe (preprocess, encoder) + predict (policy graph, sampling + decode). Both
sides get the same raw observations, one step at a time (batch 1, as on the robot), and the same
thread count. Printed as one JSON line: p50 / p99 milliseconds per stage and in total, per image size,
``speedup`` = torch eager step time / runtime step time (p50), and ``outside_graphs_fraction`` =
the share of the runtime step spent outside the encoder and policy graphs (p50).

Image sizes other than the exported one are measured on a temporary re-export of the checkpoint at
that size (the encoder graph has a fixed input size); the torch side needs the checkpoint too
(``--checkpoint``, default: the run recorded in model.yaml). Without it only the runtime is measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from vqbet_core.errors import VqbetError

STAGES = ("preprocess", "encoder", "policy", "sample_decode", "total")


def _percentiles(samples: dict[str, list[float]]) -> dict:
    return {k: {"p50": round(float(np.percentile(v, 50)), 4), "p99": round(float(np.percentile(v, 99)), 4)}
            for k, v in samples.items() if v}


def _observations(spec, n: int, raw_size: tuple[int, int] | None, seed: int = 0) -> list[tuple[dict, dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = {k: (spec.normalizer.stats[k]["mean"] + spec.normalizer.stats[k]["std"] * rng.standard_normal(d)).astype(np.float32)
               for k, d in spec.obs_dims.items()}
        imgs = {}
        for key, pre in spec.preprocess.items():
            w, h = raw_size or pre.size
            if pre.crop is not None:
                w, h = max(w, pre.crop[0] + pre.crop[2]), max(h, pre.crop[1] + pre.crop[3])
            imgs[key] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        out.append((low, imgs))
    return out


def bench_runtime(model_dir: Path, obs: list, warmup: int, threads: int | None, providers=None, seed: int = 0) -> tuple[dict, list[str]]:
    from vqbet_core.runtime.policy import PolicyRuntime

    rt = PolicyRuntime(model_dir, providers=providers, seed=seed, threads=threads)
    if rt.spec.goal_dim:
        rt.reset(goal=rt.spec.goal_names[0] if rt.spec.goal_names else rt.spec.normalizer.stats["goal"]["mean"])
    samples = {k: [] for k in STAGES + ("step",)}
    for i, (low, imgs) in enumerate(obs):
        t0 = time.perf_counter()
        rt.observe(low, imgs, stamp=i * rt.spec.period)
        rt.predict()
        step = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            for k in STAGES:
                samples[k].append(rt.last_timings.get(k, 0.0))
            samples["step"].append(step)
    outside = [t - e - p for t, e, p in zip(samples["total"], samples["encoder"], samples["policy"])]
    res = _percentiles(samples)
    res["outside_graphs_ms"] = _percentiles({"x": outside})["x"]
    return res, rt.providers


def bench_torch(run_dir: Path, spec, obs: list, warmup: int, threads: int | None, device: str = "cpu", seed: int = 0) -> dict:
    """The same step in torch eager (what TorchAgent does), timed per stage."""
    import torch

    from vqbet_core.history import ObservationHistory
    from vqbet_core.models.sampling import choose_codes, decode_codes
    from vqbet_core.train.checkpoint import load_policy
    from vqbet_core.vision.fusion import fuse_observation

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    policy, normalizer, _cfg, _meta, encoder = load_policy(run_dir, dev)
    table = policy.decode_table()
    gen = torch.Generator(device=dev).manual_seed(seed)
    history = ObservationHistory(spec.obs_window)
    goal = None
    if spec.goal_dim:
        g = spec.goal_vectors[spec.goal_names[0]] if spec.goal_names else normalizer.stats["goal"]["mean"]
        goal = torch.from_numpy(normalizer.normalize("goal", g)[None].astype(np.float32)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    samples = {k: [] for k in STAGES}
    with torch.no_grad():
        for i, (low, imgs) in enumerate(obs):
            t0 = time.perf_counter()
            lowdim = {k: normalizer.normalize(k, v.reshape(1, -1)) for k, v in low.items()}
            xs = {k: torch.from_numpy(spec.preprocess[k].to_model_input(spec.preprocess[k].crop_resize(f)[None])).to(dev)
                  for k, f in imgs.items()}
            sync()
            t1 = time.perf_counter()
            feats = {k: encoder(x).cpu().numpy() for k, x in xs.items()}
            t2 = time.perf_counter()
            feats = {k: normalizer.normalize(k, v) for k, v in feats.items()}
            hist = history.push(fuse_observation(lowdim, feats, spec.obs_keys, spec.image_keys)[0].astype(np.float32))
            x = torch.from_numpy(hist[None]).to(dev)
            sync()
            t3 = time.perf_counter()
            heads = policy.heads(x, goal)
            sync()
            t4 = time.perf_counter()
            codes = choose_codes(heads, spec.temperature, gen, spec.sequential)
            chunk = decode_codes(heads, table, codes, spec.action_chunk, spec.action_dim)[0].cpu().numpy()
            normalizer.unnormalize("action", chunk)
            t5 = time.perf_counter()
            if i >= warmup:
                for k, v in (("preprocess", (t1 - t0) + (t3 - t2)), ("encoder", t2 - t1), ("policy", t4 - t3),
                             ("sample_decode", t5 - t4), ("total", t5 - t0)):
                    samples[k].append(v * 1e3)
    return _percentiles({k: v for k, v in samples.items() if k != "encoder" or spec.image_keys})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vqbet bench policy", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model folder")
    p.add_argument("--checkpoint", default=None, help="run folder for the torch side (default: training.run in model.yaml)")
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 224], help="square image sizes (image models)")
    p.add_argument("--raw-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="raw camera frame size fed to the runtime (default: the model's image size: no resize)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for onnxruntime and torch")
    p.add_argument("--providers", nargs="+", default=None, help="onnxruntime providers (default TensorRT > CUDA > CPU)")
    p.add_argument("--torch-device", default="auto", help="torch side: cpu | cuda | auto (cuda when onnxruntime uses it)")
    p.add_argument("--no-torch", action="store_true", help="measure the runtime only")
    args = p.parse_args(argv)

    from vqbet_core.runtime.spec import load_spec

    spec = load_spec(args.model)
    run_dir = Path(args.checkpoint or spec.meta.get("training", {}).get("run", ""))
    have_ckpt = not args.no_torch and (run_dir / "checkpoint" / "meta.yaml").exists()
    if args.checkpoint and not have_ckpt and not args.no_torch:
        raise VqbetError(f"--checkpoint {args.checkpoint}: not a run folder with a checkpoint")
    import onnxruntime as ort

    result = {"bench": "policy", "model": str(args.model), "kind": spec.kind, "threads": args.threads, "steps": args.steps,
              "onnxruntime": ort.__version__, "machine": platform.machine(), "processor": platform.processor() or None,
              "obs_window": spec.obs_window, "action_chunk": spec.action_chunk, "results": {}, "speedup": {}}
    n = args.steps + args.warmup
    if spec.image_keys:
        own = spec.preprocess[spec.image_keys[0]].size
        configs = [(f"{s}x{s}", s) for s in args.sizes]
    else:
        own, configs = None, [("state", None)]
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in configs:
            model_dir = Path(args.model)
            if size is not None and (size, size) != tuple(own):
                if not (run_dir / "checkpoint" / "meta.yaml").exists():
                    result["results"][label] = {"skipped": f"the model is {own[0]}x{own[1]}; re-exporting at {size} needs --checkpoint"}
                    continue
                from vqbet_core.export.onnx_export import export_model

                model_dir = Path(tmp) / f"m{size}"
                export_model(run_dir, model_dir, parity_steps=2, image_size=size)
            sub = load_spec(model_dir, verify_hashes=False)
            obs = _observations(sub, n, tuple(args.raw_size) if args.raw_size else None)
            rt_res, providers = bench_runtime(model_dir, obs, args.warmup, args.threads, args.providers)
            entry = {"image_size": None if size is None else [size, size],
                     "raw_frame": None if not sub.image_keys else list(args.raw_size or sub.preprocess[sub.image_keys[0]].size),
                     "providers": providers, "runtime_ms": rt_res}
            total = rt_res["total"]["p50"]
            entry["outside_graphs_fraction"] = round(rt_res["outside_graphs_ms"]["p50"] / total, 4) if total else None
            if have_ckpt:
                device = args.torch_device
                if device == "auto":
                    device = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
                entry["torch_device"] = device
                entry["torch_eager_ms"] = t_res = bench_torch(run_dir, sub, obs, args.warmup, args.threads, device)
                entry["speedup"] = round(t_res["total"]["p50"] / total, 3) if total else None
                result["speedup"][label] = entry["speedup"]
            result["results"][label] = entry
    if not have_ckpt:
        result["torch"] = "not measured (no checkpoint: pass --checkpoint RUN)" if not args.no_torch else "not measured (--no-torch)"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
