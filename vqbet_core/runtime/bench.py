"""``vqbet bench policy --model DIR``: per-stage step latency of the runtime vs the same model in torch eager.

One control step = observe (preprocess, encoder) + predict (policy graph, sampling + decode). Both
sides get the same raw observations, one step at a time (batch 1, as on the robot), and the same
thread count, in alternating blocks of steps so load changes on a shared machine hit both alike. Printed as
one JSON line: p50 / p99 / min milliseconds per stage and in total, per image size,
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
    return {k: {"p50": round(float(np.percentile(v, 50)), 4), "p99": round(float(np.percentile(v, 99)), 4),
                "max": round(float(np.max(v)), 4), "min": round(float(np.min(v)), 4)} for k, v in samples.items() if v}


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


class RuntimeStepper:
    """One runtime control step per call; per-stage milliseconds from ``PolicyRuntime.last_timings``."""

    def __init__(self, model_dir: Path, threads: int | None, providers=None, seed: int = 0, precision: str | None = None):
        from vqbet_core.runtime.policy import PolicyRuntime

        self.rt = PolicyRuntime(model_dir, providers=providers, seed=seed, threads=threads, precision=precision)
        if self.rt.spec.goal_dim:
            spec = self.rt.spec
            self.rt.reset(goal=spec.goal_names[0] if spec.goal_names else spec.normalizer.stats["goal"]["mean"])
        self.i = 0

    def __call__(self, low: dict, imgs: dict) -> dict:
        t0 = time.perf_counter()
        self.rt.observe(low, imgs, stamp=self.i * self.rt.spec.period)
        self.rt.predict()
        step = (time.perf_counter() - t0) * 1e3
        self.i += 1
        t = self.rt.last_timings
        return {**{k: t.get(k, 0.0) for k in STAGES}, "step": step,
                "outside_graphs": t["total"] - t["encoder"] - t["policy"]}


class TorchStepper:
    """The same step in torch eager (what ``TorchAgent`` does), timed per stage."""

    def __init__(self, run_dir: Path, spec, threads: int | None, device: str = "cpu", seed: int = 0):
        import torch

        from vqbet_core.history import ObservationHistory
        from vqbet_core.train.checkpoint import load_policy

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.dev = torch.device(device)
        self.spec = spec
        self.policy, self.normalizer, _cfg, _meta, self.encoder = load_policy(run_dir, self.dev)
        self.table = self.policy.decode_table()
        self.gen = torch.Generator(device=self.dev).manual_seed(seed)
        self.history = ObservationHistory(spec.obs_window)
        self.goal = None
        if spec.goal_dim:
            g = spec.goal_vectors[spec.goal_names[0]] if spec.goal_names else self.normalizer.stats["goal"]["mean"]
            self.goal = torch.from_numpy(self.normalizer.normalize("goal", g)[None].astype(np.float32)).to(self.dev)
        self.sync = torch.cuda.synchronize if self.dev.type == "cuda" else (lambda: None)

    def __call__(self, low: dict, imgs: dict) -> dict:
        from vqbet_core.models.sampling import choose_codes, decode_codes
        from vqbet_core.vision.fusion import fuse_observation

        torch, spec, norm = self.torch, self.spec, self.normalizer
        with torch.no_grad():
            t0 = time.perf_counter()
            lowdim = {k: norm.normalize(k, v.reshape(1, -1)) for k, v in low.items()}
            xs = {k: torch.from_numpy(spec.preprocess[k].to_model_input(spec.preprocess[k].crop_resize(f)[None])).to(self.dev)
                  for k, f in imgs.items()}
            self.sync()
            t1 = time.perf_counter()
            feats = {k: self.encoder(x).cpu().numpy() for k, x in xs.items()}
            t2 = time.perf_counter()
            feats = {k: norm.normalize(k, v) for k, v in feats.items()}
            hist = self.history.push(fuse_observation(lowdim, feats, spec.obs_keys, spec.image_keys)[0].astype(np.float32))
            x = torch.from_numpy(hist[None]).to(self.dev)
            self.sync()
            t3 = time.perf_counter()
            heads = self.policy.heads(x, self.goal)
            self.sync()
            t4 = time.perf_counter()
            codes = choose_codes(heads, spec.temperature, self.gen, spec.sequential)
            chunk = decode_codes(heads, self.table, codes, spec.action_chunk, spec.action_dim)[0].cpu().numpy()
            norm.unnormalize("action", chunk)
            t5 = time.perf_counter()
        return {"preprocess": 1e3 * ((t1 - t0) + (t3 - t2)), "encoder": 1e3 * (t2 - t1), "policy": 1e3 * (t4 - t3),
                "sample_decode": 1e3 * (t5 - t4), "total": 1e3 * (t5 - t0)}


def bench_pair(runtime: RuntimeStepper, torch_side: TorchStepper | None, obs: list, warmup: int,
               block: int = 20) -> tuple[dict, dict | None]:
    """Runtime and torch in alternating blocks of ``block`` steps (same observations), so load changes on a
    shared machine hit both alike while neither side's spinning worker threads slow the other's every step."""
    rt_samples: dict[str, list[float]] = {}
    th_samples: dict[str, list[float]] = {}
    for start in range(0, len(obs), block):
        for side, samples in ((runtime, rt_samples), (torch_side, th_samples)):
            if side is None:
                continue
            for i in range(start, min(start + block, len(obs))):
                r = side(*obs[i])
                if i >= warmup:
                    for k, v in r.items():
                        samples.setdefault(k, []).append(v)
    if not runtime.rt.spec.image_keys:
        rt_samples.pop("encoder", None)
        th_samples.pop("encoder", None)
    return _percentiles(rt_samples), (_percentiles(th_samples) if torch_side is not None else None)


def _int8_side(model_dir: Path, tmp: Path, label: str, args, obs: list, fp32: dict) -> dict:
    """Quantize a copy of ``model_dir`` (decision check reported, not enforced) and time it on the same steps."""
    import shutil

    from vqbet_core.export.quantize import quantize_encoder

    copy = tmp / f"int8_{label}"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(model_dir, copy)
    from vqbet_core.data.store import ZarrDataset

    n = ZarrDataset.open(args.int8_data, "r").n_steps
    frames = min(100, max(8, n // 2))
    report = quantize_encoder(copy, args.int8_data, frames=frames, holdout=min(50, n - frames), min_agreement=0.0,
                              min_cosine=0.0)
    stepper = RuntimeStepper(copy, args.threads, args.providers, precision="int8")
    res, _ = bench_pair(stepper, None, obs, args.warmup)
    return {"runtime_int8_ms": res, "int8_parity": report["parity"],
            "int8_encoder_speedup": round(fp32["encoder"]["p50"] / res["encoder"]["p50"], 3) if res["encoder"]["p50"] else None,
            "int8_step_speedup": round(fp32["total"]["p50"] / res["total"]["p50"], 3) if res["total"]["p50"] else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vqbet bench policy",
                                description="Per-stage step latency of an exported model: onnxruntime runtime vs torch eager (one JSON line).")
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
    p.add_argument("--int8-data", default=None, metavar="D.zarr",
                   help="also measure an int8 encoder (vqbet quantize, calibrated on this dataset's frames) side by side")
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
            runtime = RuntimeStepper(model_dir, args.threads, args.providers)
            providers = runtime.rt.providers
            torch_side, device = None, None
            if have_ckpt:
                device = args.torch_device
                if device == "auto":
                    device = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
                torch_side = TorchStepper(run_dir, sub, args.threads, device)
            rt_res, th_res = bench_pair(runtime, torch_side, obs, args.warmup)
            entry = {"image_size": None if size is None else [size, size],
                     "raw_frame": None if not sub.image_keys else list(args.raw_size or sub.preprocess[sub.image_keys[0]].size),
                     "providers": providers, "precision": runtime.rt.precision, "runtime_ms": rt_res}
            if args.int8_data and sub.image_keys:
                entry.update(_int8_side(model_dir, Path(tmp), label, args, obs, rt_res))
            total = rt_res["total"]["p50"]
            entry["outside_graphs_fraction"] = round(rt_res["outside_graphs"]["p50"] / total, 4) if total else None
            if th_res is not None:
                entry["torch_device"] = device
                entry["torch_eager_ms"] = th_res
                entry["speedup"] = round(th_res["total"]["p50"] / total, 3) if total else None
                result["speedup"][label] = entry["speedup"]
            result["results"][label] = entry
    if not have_ckpt:
        result["torch"] = "not measured (no checkpoint: pass --checkpoint RUN)" if not args.no_torch else "not measured (--no-torch)"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
