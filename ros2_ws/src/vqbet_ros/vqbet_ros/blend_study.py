"""Chunk boundaries over ROS: how smooth the executed motion is per blend mode, and what it costs in success.

``python -m vqbet_ros.blend_study --model DIR --episodes N --out DIR`` runs, for one exported block-push model
(``python -m vqbet_ros.sim_demo`` makes one), ``N`` episodes per blend mode of ``policy_node`` (``average``: the
paper's equal weights; ``exp``: older predictions down-weighted by ``exp(-w * age in steps)``; ``none``: each
chunk as predicted) through the sim demo's loop - ``sim_robot_node`` and ``policy_node`` as separate processes
over DDS on loopback, real time, fresh processes per mode so every mode plays the same env seeds
(:func:`vqbet_ros.sim_demo.evaluate_over_ros`).

What is measured: ``sim_robot_node`` follows the trajectories like Jazzy's ``joint_trajectory_controller``
(splines through positions and velocities, a late trajectory joined at the current time, a new one replacing
the running one) and reports, per episode, the position it commanded at every control tick
(:func:`vqbet_core.sim.robot.motion_metrics`: the largest and mean tick-to-tick velocity jump, peak and p99
jerk). On the sim the policy steps once per camera frame, so every tick is a chunk boundary: a new chunk
replaces the running one each control period, and these figures are the motion executed across the
boundaries. Per mode: those figures (mean over episodes and worst episode), the block-push outcome (R1, R2,
P1, P2) and the policy node's counters (published, late chunks, skipped steps, points dropped as already past
by the latency compensation, latency p50 / p99 over its last 500 steps).

Writes ``study.json`` (and node logs) in ``--out`` and the plot (``--plot``, default ``OUT/blend_study.png``);
prints one JSON line (the per-mode summary).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vqbet_core.errors import VqbetError

MODES = ("average", "exp", "none")
MOTION_KEYS = ("max_velocity_jump", "mean_velocity_jump", "peak_jerk", "p99_jerk")
POLICY_COUNTERS = ("published", "late_chunks", "rejected_outputs", "skipped_steps", "dropped_past_points",
                   "latency_p50_ms", "latency_p99_ms")
DEFAULTS = {"episodes": 6, "max_steps": 200, "image_size": 96, "seed": 1000, "exp_weight": 0.5}


def _number(value):
    """A /diagnostics value (a string) as int or float; None stays None."""
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return int(f) if f.is_integer() and "." not in str(value) else f


def summarize_mode(results: list[dict], stats: dict) -> dict:
    """Episode results of one mode (``/sim/episode_result`` payloads) + its node counters -> the mode's row."""
    from vqbet_core.sim.base import EpisodeResult
    from vqbet_core.sim.blockpush import BlockPushEnv

    outcome = BlockPushEnv.summarize([EpisodeResult(bool(r["success"]), r["mode"], int(r["length"]), r["info"])
                                      for r in results])
    motion = {}
    for key in MOTION_KEYS:
        values = np.array([float(r["motion"].get(key, float("nan"))) for r in results], np.float64)
        motion[key] = {"mean": float(np.mean(values)), "worst": float(np.max(values)),
                       "episodes": [round(float(v), 4) for v in values]}
    policy = {k: _number(stats.get("policy_node", {}).get(k)) for k in POLICY_COUNTERS}
    sim = {k: _number(v) for k, v in stats.get("sim_robot_node", {}).items()}
    return {"episodes": len(results), "seeds": [int(r["seed"]) for r in results],
            **{k: outcome[k] for k in ("R1", "R2", "P1", "P2", "success")},
            "motion": motion, "policy_node": policy, "sim_robot_node": sim,
            "mean_trajectories_per_episode": float(np.mean([r["trajectories"] for r in results])),
            "mean_length": float(np.mean([r["length"] for r in results])),
            "wall_s": round(float(sum(r.get("wall_s", 0.0) for r in results)), 1)}


def plot(study: dict, path: Path) -> Path:
    """Three panels per mode: velocity jump and peak jerk at chunk boundaries (bars: mean over episodes,
    marker: worst episode), and R1 / R2 / P1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(study["modes"])
    labels = [f"exp (w={study['exp_weight']:g})" if m == "exp" else m for m in modes]
    rows = [study["modes"][m] for m in modes]
    x = np.arange(len(modes))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, title, unit in ((axes[0], "max_velocity_jump", "largest velocity jump per episode", "m/s"),
                                 (axes[1], "peak_jerk", "peak jerk per episode", "m/s³")):
        mean = [r["motion"][key]["mean"] for r in rows]
        worst = [r["motion"][key]["worst"] for r in rows]
        ax.bar(x, mean, color=["#4c72b0", "#dd8452", "#55a868"][:len(modes)], label="mean over episodes")
        ax.plot(x, worst, "k_", markersize=22, markeredgewidth=2, label="worst episode")
        ax.set_xticks(x, labels)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.25 * max(worst + [1e-9]))
        ax.legend(fontsize=8, loc="upper left")
    ax = axes[2]
    width = 0.25
    for i, (key, color) in enumerate((("R1", "#8fbcd4"), ("R2", "#4c72b0"), ("P1", "#c44e52"))):
        ax.bar(x + (i - 1) * width, [r[key] for r in rows], width, color=color, label=key)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.3)
    ax.set_title("block push (fraction of episodes)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    n = study["episodes"]
    fig.suptitle(f"Executed motion at chunk boundaries over ROS (sim_robot_node as joint_trajectory_controller, "
                 f"chunk {study['action_chunk']} at {study['control_hz']:g} Hz, {n} episodes per mode, "
                 f"{study['date']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _git_commit() -> str | None:
    from vqbet_ros.sim_demo import REPO

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_study(model: Path, episodes: int, out: Path, modes=MODES, exp_weight: float = DEFAULTS["exp_weight"],
              max_steps: int = DEFAULTS["max_steps"], image_size: int = DEFAULTS["image_size"],
              seed: int = DEFAULTS["seed"], calibration: Path | None = None, plot_path: Path | None = None,
              command: str | None = None) -> dict:
    """Run the study; returns what ``study.json`` holds."""
    from vqbet_core.runtime.spec import load_spec
    from vqbet_ros.sim_demo import CALIBRATION, evaluate_over_ros

    calibration = Path(calibration or CALIBRATION).resolve()
    spec = load_spec(model)
    out.mkdir(parents=True, exist_ok=True)
    study = {"model": str(model), "model_name": spec.name, "action_chunk": spec.action_chunk,
             "obs_window": spec.obs_window, "control_hz": spec.control_hz, "model_blend": spec.blend,
             "episodes": episodes, "max_steps": max_steps, "seed": seed, "exp_weight": exp_weight,
             "image_size": image_size, "calibration": str(calibration),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
             "commit": _git_commit(), "cpus": os.cpu_count(), "clock": "real time (no lockstep)",
             "latency_compensation": "trajectory stamped with the observation; points already past at publish "
                                     "are dropped (counted: dropped_past_points), lead = one control period",
             "command": command,
             "modes": {}}
    t_all = time.monotonic()
    for mode in modes:
        params = {"blend": mode}
        if mode == "exp":
            params["blend_exp_weight"] = float(exp_weight)
        print(f"blend {mode}: {episodes} episodes", file=sys.stderr, flush=True)
        results, stats = evaluate_over_ros(model, episodes, image_size, max_steps, seed, out / "logs" / mode, None,
                                           calibration=calibration, policy_params=params)
        study["modes"][mode] = summarize_mode(results, stats)
        study["modes"][mode]["episode_results"] = [
            {"seed": r["seed"], "success": r["success"], "length": r["length"], "trajectories": r["trajectories"],
             "reached": r["info"].get("reached"), "in_target": r["info"].get("in_target"), "motion": r["motion"]}
            for r in results]
    study["wall_s"] = round(time.monotonic() - t_all, 1)
    (out / "study.json").write_text(json.dumps(study, indent=2))
    study["plot"] = str(plot(study, plot_path or out / "blend_study.png"))
    (out / "study.json").write_text(json.dumps(study, indent=2))
    return study


def summary_line(study: dict) -> dict:
    """The printed line: per mode, the headline figures."""
    rows = {}
    for mode, r in study["modes"].items():
        rows[mode] = {"max_velocity_jump_mean": round(r["motion"]["max_velocity_jump"]["mean"], 4),
                      "max_velocity_jump_worst": round(r["motion"]["max_velocity_jump"]["worst"], 4),
                      "mean_velocity_jump": round(r["motion"]["mean_velocity_jump"]["mean"], 4),
                      "peak_jerk_mean": round(r["motion"]["peak_jerk"]["mean"], 2),
                      "peak_jerk_worst": round(r["motion"]["peak_jerk"]["worst"], 2),
                      "p99_jerk_mean": round(r["motion"]["p99_jerk"]["mean"], 2),
                      **{k: r[k] for k in ("R1", "R2", "P1", "P2")},
                      **{k: r["policy_node"][k] for k in ("late_chunks", "skipped_steps", "dropped_past_points",
                                                          "latency_p50_ms", "latency_p99_ms")}}
    return {"study": "blend", "episodes": study["episodes"], "max_steps": study["max_steps"],
            "action_chunk": study["action_chunk"], "exp_weight": study["exp_weight"], "modes": rows,
            "plot": study.get("plot"), "wall_s": study["wall_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqbet_ros.blend_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported block-push model folder (vqbet export / sim_demo)")
    p.add_argument("--episodes", type=int, default=DEFAULTS["episodes"], help="episodes per blend mode")
    p.add_argument("--out", required=True, help="output folder: study.json, node logs")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated blend modes, of {', '.join(MODES)}")
    p.add_argument("--exp-weight", type=float, default=DEFAULTS["exp_weight"],
                   help="exp mode: weight of an earlier prediction exp(-w * age in control steps)")
    p.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"], help="env steps per episode")
    p.add_argument("--image-size", type=int, default=DEFAULTS["image_size"],
                   help="camera frame size (must match the calibration's camera)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="env seed of each mode's first episode")
    p.add_argument("--calibration", default=None, help="calibration YAML (default calibration/blockpush_sim.yaml)")
    p.add_argument("--plot", default=None, help="plot PNG (default OUT/blend_study.png)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    try:
        modes = _check(args)
        study = run_study(Path(args.model).resolve(), args.episodes, Path(args.out), modes, args.exp_weight,
                          args.max_steps, args.image_size, args.seed,
                          Path(args.calibration) if args.calibration else None,
                          Path(args.plot) if args.plot else None,
                          "python -m vqbet_ros.blend_study " + " ".join(argv))
    except VqbetError as exc:
        print(f"blend_study: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary_line(study)))
    return 0


def _check(args) -> list[str]:
    for name in ("episodes", "max_steps"):
        if getattr(args, name) < 1:
            raise VqbetError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 16:
        raise VqbetError(f"--image-size must be >= 16, got {args.image_size}")
    if not (math.isfinite(args.exp_weight) and args.exp_weight >= 0):
        raise VqbetError(f"--exp-weight must be a finite number >= 0, got {args.exp_weight}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad or len(set(modes)) != len(modes):
        raise VqbetError(f"--modes must be distinct names of {', '.join(MODES)}, got {args.modes!r}")
    model = Path(args.model)
    if not (model / "model.yaml").is_file():
        raise VqbetError(f"--model {model}: no model.yaml there (an exported model folder: vqbet export)")
    if args.calibration and not Path(args.calibration).is_file():
        raise VqbetError(f"--calibration {args.calibration}: file not found")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise VqbetError(f"--out {out} exists and is not a folder")
    return modes


if __name__ == "__main__":
    sys.exit(main())
