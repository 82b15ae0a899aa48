"""``vqbet bench policy --model DIR``: per-stage step latency of the runtime vs the same model in torch eager.

One control step = observe (preprocess, encoder) + predict (policy graph, sampling + decode). Every
side (the runtime at its default session settings, the int8 encoder with ``--int8-data``, other session
settings with ``--session-variants``, torch eager) gets the same raw observations, one step at a time
(batch 1, as on the robot), and the same thread count, in alternating blocks of steps so load changes on a
shared machine hit all alike. Printed as one JSON line: p50 / p99 / max / min milliseconds per stage and
in total, per image size; ``speedup`` = torch eager step time / runtime step time (p50),
``jitter_p99_over_p50`` = the whole step's p99 / p50, ``outside_graphs_fraction`` = the share of the
runtime step spent outside the encoder and policy graphs (p50), ``providers`` = what onnxruntime actually
registered per graph. ``--plot`` draws the step per configuration.

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

    def __init__(self, model_dir: Path, settings, providers=None, seed: int = 0, precision: str | None = None):
        from vqbet_core.runtime.policy import PolicyRuntime

        self.rt = PolicyRuntime(model_dir, providers=providers, seed=seed, precision=precision, settings=settings)
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


def bench_sides(sides: dict, obs: list, warmup: int, block: int = 20) -> dict[str, dict]:
    """Every side (runtime variants, torch) in alternating blocks of ``block`` steps on the same observations,
    so load changes on a shared machine hit all alike while no side's spinning worker threads slow another's
    every step. Returns per side the p50 / p99 / max / min of each stage."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
    for start in range(0, len(obs), block):
        for name, side in sides.items():
            for i in range(start, min(start + block, len(obs))):
                r = side(*obs[i])
                if i >= warmup:
                    for k, v in r.items():
                        samples[name].setdefault(k, []).append(v)
    out = {}
    for name, per_stage in samples.items():
        if per_stage.get("encoder") is not None and not any(per_stage["encoder"]):
            per_stage.pop("encoder")  # a state model: no encoder stage
        out[name] = _percentiles(per_stage)
    return out


def parse_variant(text: str, threads: int | None):
    """``spin=1,io_binding=1,threads=1`` -> ``SessionSettings`` (unnamed fields: the runtime's defaults)."""
    from vqbet_core.runtime.session import SessionSettings

    fields = {"threads": threads}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("spin", "io_binding", "threads", "warmup"):
            raise VqbetError(f"session settings {text!r}: expected KEY=VALUE items with KEY in spin, io_binding, threads, warmup")
        try:
            fields[key] = bool(int(value)) if key in ("spin", "io_binding") else int(value)
        except ValueError:
            raise VqbetError(f"session settings {text!r}: {key} needs an integer (0/1 for spin, io_binding)") from None
    return SessionSettings(**fields)


def jitter(res: dict) -> float | None:
    """p99 / p50 of the whole step: what makes an arm stutter, as a ratio (1.0 = no jitter)."""
    t = res.get("step") or res.get("total")
    return round(t["p99"] / t["p50"], 3) if t and t["p50"] else None


def _int8_stepper(model_dir: Path, tmp: Path, label: str, args, settings) -> tuple["RuntimeStepper", dict]:
    """A quantized copy of ``model_dir`` (decision check reported, not enforced) and its stepper."""
    import shutil

    from vqbet_core.data.store import ZarrDataset
    from vqbet_core.export.quantize import quantize_encoder

    copy = tmp / f"int8_{label}"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(model_dir, copy)
    n = ZarrDataset.open(args.int8_data, "r").n_steps
    frames = min(100, max(8, n // 2))
    report = quantize_encoder(copy, args.int8_data, frames=frames, holdout=min(200, n - frames), min_agreement=0.0,
                              min_cosine=0.0, method=args.int8_method, keep_ends_fp32=args.int8_keep_ends)
    return RuntimeStepper(copy, settings, args.providers, precision="int8"), report


def _ratio(a: dict, b: dict, stage: str) -> float | None:
    return round(a[stage]["p50"] / b[stage]["p50"], 3) if stage in a and stage in b and b[stage]["p50"] else None


def plot(result: dict, path: str) -> None:
    """Step latency per configuration (p50 bar, p99 tick): the README's speed picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for label, entry in result["results"].items():
        for key, name in (("runtime_ms", "onnxruntime fp32"), ("runtime_int8_ms", "onnxruntime int8"),
                          ("torch_eager_ms", "torch eager")):
            if key in entry:
                rows.append((f"{label} {name}", entry[key]["step" if "step" in entry[key] else "total"]))
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.0))
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r[1]["p50"] for r in rows], color="#4c72b0", label="p50")
    ax.scatter([r[1]["p99"] for r in rows], y, marker="|", s=200, color="#c44e52", label="p99", zorder=3)
    ax.set_yticks(y, [r[0] for r in rows])
    ax.set_xlabel("policy step (ms), batch 1")
    ax.set_title(f"{result['threads']} thread(s), {result['steps']} steps, {result.get('processor') or result['machine']}", fontsize=9)
    ax.set_xlim(0, 1.15 * max(r[1]["p99"] for r in rows))
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--int8-method", choices=["minmax", "percentile", "entropy"], default="minmax",
                   help="with --int8-data: activation calibration (vqbet quantize --method)")
    p.add_argument("--int8-keep-ends", action="store_true", help="with --int8-data: first and last convolution in fp32")
    p.add_argument("--session", default="", metavar="K=V,...",
                   help="session settings of the measured runtime (default: the runtime's defaults), e.g. spin=1")
    p.add_argument("--session-variants", nargs="+", default=[], metavar="K=V,...",
                   help="also time the runtime with other session settings, e.g. spin=1 io_binding=1 threads=1 "
                        "(keys: spin, io_binding, threads, warmup; the rest as the runtime's defaults)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw step p50 / p99 per configuration into this file")
    args = p.parse_args(argv)

    from vqbet_core.runtime.spec import load_spec

    spec = load_spec(args.model)
    run_dir = Path(args.checkpoint or spec.meta.get("training", {}).get("run", ""))
    have_ckpt = not args.no_torch and (run_dir / "checkpoint" / "meta.yaml").exists()
    if args.checkpoint and not have_ckpt and not args.no_torch:
        raise VqbetError(f"--checkpoint {args.checkpoint}: not a run folder with a checkpoint")
    default = parse_variant(args.session, args.threads)
    variants = {v: parse_variant(v, args.threads) for v in args.session_variants}
    import onnxruntime as ort

    result = {"bench": "policy", "model": str(args.model), "kind": spec.kind, "threads": args.threads, "steps": args.steps,
              "onnxruntime": ort.__version__, "machine": platform.machine(), "processor": platform.processor() or None,
              "obs_window": spec.obs_window, "action_chunk": spec.action_chunk,
              "session": {k: getattr(default, k) for k in ("threads", "spin", "io_binding", "warmup")},
              "results": {}, "speedup": {}}
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
            runtime = RuntimeStepper(model_dir, default, args.providers)
            sides: dict = {"runtime": runtime}
            int8_report = None
            if args.int8_data and sub.image_keys:
                sides["runtime_int8"], int8_report = _int8_stepper(model_dir, Path(tmp), label, args, default)
            for name, settings in variants.items():
                sides[f"variant:{name}"] = RuntimeStepper(model_dir, settings, args.providers)
            device = None
            if have_ckpt:
                device = args.torch_device
                if device == "auto":
                    device = "cuda" if "CUDAExecutionProvider" in runtime.rt.providers else "cpu"
                sides["torch"] = TorchStepper(run_dir, sub, args.threads, device)
            res = bench_sides(sides, obs, args.warmup)
            rt_res = res["runtime"]
            entry = {"image_size": None if size is None else [size, size],
                     "raw_frame": None if not sub.image_keys else list(args.raw_size or sub.preprocess[sub.image_keys[0]].size),
                     "providers": runtime.rt.graph_providers, "precision": runtime.rt.precision,
                     "io_binding": runtime.rt.policy_graph.bound, "runtime_ms": rt_res, "jitter_p99_over_p50": jitter(rt_res)}
            if int8_report is not None:
                i8 = res["runtime_int8"]
                entry.update({"runtime_int8_ms": i8, "int8_parity": int8_report["parity"],
                              "int8_providers": sides["runtime_int8"].rt.graph_providers,
                              "int8_encoder_speedup": _ratio(rt_res, i8, "encoder"),
                              "int8_step_speedup": _ratio(rt_res, i8, "step"),
                              "int8_jitter_p99_over_p50": jitter(i8)})
            if variants:
                entry["variants"] = {name: {"step": res[f"variant:{name}"]["step"], "encoder": res[f"variant:{name}"].get("encoder"),
                                            "policy": res[f"variant:{name}"]["policy"],
                                            "jitter_p99_over_p50": jitter(res[f"variant:{name}"])} for name in variants}
            total = rt_res["total"]["p50"]
            entry["outside_graphs_fraction"] = round(rt_res["outside_graphs"]["p50"] / total, 4) if total else None
            if "torch" in res:
                th_res = res["torch"]
                entry["torch_device"] = device
                entry["torch_eager_ms"] = th_res
                entry["speedup"] = round(th_res["total"]["p50"] / total, 3) if total else None
                result["speedup"][label] = entry["speedup"]
                if int8_report is not None:
                    entry["int8_speedup_vs_torch"] = _ratio(th_res, res["runtime_int8"], "total")
            result["results"][label] = entry
    if not have_ckpt:
        result["torch"] = "not measured (no checkpoint: pass --checkpoint RUN)" if not args.no_torch else "not measured (--no-torch)"
    if args.plot:
        plot(result, args.plot)
        result["plot"] = args.plot
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
