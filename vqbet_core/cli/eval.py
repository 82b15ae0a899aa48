"""``vqbet eval``: closed-loop rollouts in simulation; prints one JSON line of the env's metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run folder written by vqbet train (torch)")
    src.add_argument("--model", help="exported model folder (onnxruntime, as on the robot)")
    p.add_argument("--env", required=True, help="multipath | blockpush | pusht_image | kitchen")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=1000, help="env seed of the first episode (then +1 per episode)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's)")
    p.add_argument("--precision", choices=["fp32", "int8"], default=None,
                   help="with --model: the image encoder to run (default: model.yaml's encoder_precision)")
    p.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="env constructor argument (default: the ones the training demos were made with)")
    p.add_argument("--plot", help="save a plot (trajectories for multipath, mode frequencies otherwise) to this PNG")
    p.add_argument("--video", help="save an mp4 of the first episode")
    p.add_argument("--contact-sheet", help="save a contact sheet PNG of the first episode")
    p.add_argument("--blend", choices=["average", "none"], default=None,
                   help="average overlapping chunks (the paper) or execute the newest chunk's first action "
                        "(default: the model's sampling.blend)")
    p.add_argument("--task-sequence", default=None, metavar="random|A,B,C",
                   help="goal-conditioned long-horizon evaluation: ask for these subtasks in this order (comma-separated "
                        "names), or 'random' (a random order per episode, from its seed)")
    p.add_argument("--advance", choices=["model", "oracle"], default="model",
                   help="with --task-sequence: the goal advances on the model's completion score (model, as on the "
                        "robot) or on the simulator's ground truth (oracle)")
    p.add_argument("--completion-threshold", type=float, default=0.5,
                   help="with --advance model: completion score that counts as 'subtask done'")
    p.add_argument("--completion-debounce", type=float, default=0.16,
                   help="with --advance model: seconds the score must stay above the threshold (0.16: two kitchen steps)")
    p.add_argument("--completion-refractory", type=float, default=1.0,
                   help="with --advance model: seconds after an advance whose scores do not count")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1,
                   help="rollout processes (episodes are spread over them; results equal one process's)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")


def parse_env_args(items: list[str]) -> dict:
    import yaml

    from vqbet_core.errors import VqbetError

    out = {}
    for item in items:
        if "=" not in item:
            raise VqbetError(f"--env-arg expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def run(args) -> int:
    import os
    from dataclasses import replace

    import torch

    from vqbet_core.errors import VqbetError
    from vqbet_core.evaluate import (RolloutSpec, contact_sheet, make_agent, parallel_rollout, plot_mode_frequencies,
                                     evaluation_scene, recorded_dataset_attrs, rollout, write_video)
    from vqbet_core.sim import env_class, make_env

    if args.workers < 1:
        raise VqbetError(f"--workers {args.workers}: expected a positive number of processes")
    if args.episodes < 1:
        raise VqbetError(f"--episodes {args.episodes}: expected a positive number of episodes")
    if args.precision and not args.model:
        raise VqbetError(f"--precision {args.precision}: only for an exported model (--model DIR); a checkpoint runs in torch")
    workers = min(args.workers, args.episodes)
    sequence = None
    if args.task_sequence is not None:
        from vqbet_core.evaluate import SequenceSpec

        order = "random" if args.task_sequence.strip() == "random" else tuple(
            t.strip() for t in args.task_sequence.split(",") if t.strip())
        if not order:
            raise VqbetError("--task-sequence: expected 'random' or comma-separated subtask names, got an empty list")
        if not 0 < args.completion_threshold <= 1:
            raise VqbetError(f"--completion-threshold {args.completion_threshold}: expected a score in (0, 1]")
        for name in ("debounce", "refractory"):
            if not getattr(args, f"completion_{name}") >= 0:
                raise VqbetError(f"--completion-{name} {getattr(args, f'completion_{name}')}: expected seconds >= 0")
        sequence = SequenceSpec(order, args.advance, args.completion_threshold, args.completion_debounce,
                                args.completion_refractory)
    spec = RolloutSpec(env=args.env, env_args={}, checkpoint=args.checkpoint, model=args.model, device=args.device,
                       temperature=args.temperature, blend=None if args.blend is None else args.blend == "average",
                       threads=None if workers == 1 else max(1, (os.cpu_count() or 1) // workers), sequence=sequence,
                       precision=args.precision)
    attrs = recorded_dataset_attrs(spec)
    if sequence is not None:
        _check_sequence_model(spec, sequence, attrs)
    env_args, notices = evaluation_scene(args.env, attrs, parse_env_args(args.env_arg))
    for notice in notices:
        print(f"vqbet eval: {notice}", file=sys.stderr)
    want_frames = 1 if (args.video or args.contact_sheet) else 0
    if workers > 1:  # each worker builds its own agent and env
        results, trajectories, frames = parallel_rollout(
            replace(spec, env_args=env_args), args.episodes, workers, seed=args.seed, max_steps=args.max_steps,
            frames_for=want_frames, progress=args.progress)
        env = None  # the workers' envs are gone; metrics need only the class, the multipath plot an instance
    else:
        agent = make_agent(spec, seed=args.seed)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        env = make_env(args.env, **env_args)
        results, trajectories, frames = rollout(env, agent, args.episodes, seed=args.seed, max_steps=args.max_steps,
                                                frames_for=want_frames, progress=args.progress, sequence=sequence)
    metrics = env_class(args.env).summarize(results, attrs.get("episode_modes"))
    if sequence is not None:
        from vqbet_core.evaluate import summarize_sequences

        metrics = {"task_sequence": args.task_sequence, "advance": args.advance,
                   **summarize_sequences(results, attrs.get("episode_modes")), **metrics}
    if args.plot:
        if args.env == "multipath":
            from vqbet_core.sim.multipath import plot_trajectories

            plot_trajectories(trajectories, [r.mode for r in results], args.plot, env or make_env(args.env, **env_args))
        else:
            freq_key = next((k for k in metrics if k.endswith("_freq") and not k.startswith("demo_")), None)
            if freq_key:
                plot_mode_frequencies(metrics[freq_key], metrics.get(f"demo_{freq_key}"), args.plot, f"{args.env}: mode frequencies")
    if frames and args.video:
        write_video(frames[0], args.video, fps=float(attrs.get("control_hz", 10)))
    if frames and args.contact_sheet:
        contact_sheet(frames[0], args.contact_sheet)
    if env is not None:
        env.close()
    extra = {}
    if args.model:
        from vqbet_core.runtime.policy import encoder_precision
        from vqbet_core.runtime.spec import load_spec

        model = load_spec(args.model, verify_hashes=False)
        extra["encoder_precision"] = encoder_precision(model, args.precision) if model.image_keys else None
    print(json.dumps({"env": args.env, "source": str(Path(args.checkpoint or args.model)), "env_args": env_args, **extra, **metrics}))
    return 0


def _check_sequence_model(spec, sequence, attrs: dict) -> None:
    """A sequence needs a model trained on subtask goals (and, to advance by itself, its completion head)."""
    from vqbet_core.errors import VqbetError

    names = attrs.get("task_names")
    if not (attrs.get("goal_vectors") and names):
        raise VqbetError(f"--task-sequence: {spec.checkpoint or spec.model} is not goal-conditioned on subtasks "
                         "(train it with data.goal_key: task_index, e.g. --config kitchen_goal)")
    if sequence.order != "random":
        unknown = [t for t in sequence.order if t not in names]
        if unknown:
            raise VqbetError(f"--task-sequence: unknown subtask(s) {unknown} (the model knows: {', '.join(names)})")
        if len(set(sequence.order)) != len(sequence.order):
            raise VqbetError(f"--task-sequence: a subtask appears twice in {list(sequence.order)}")
    if sequence.advance == "model":
        if spec.checkpoint:
            from vqbet_core.train.checkpoint import load_meta

            horizon = int((load_meta(Path(spec.checkpoint))[0].get("completion") or {}).get("horizon") or 0)
        else:
            from vqbet_core.runtime.spec import load_spec

            horizon = load_spec(spec.model, verify_hashes=False).completion_horizon
        if not horizon:
            raise VqbetError("--advance model: this model has no completion head (completion.horizon: 0); "
                             "use --advance oracle or train with a completion horizon")
