"""``vqbet sim-demos``: run an env's scripted multimodal expert and keep its successful episodes as a dataset.

Why keep only successes: the policies imitate whatever is in the data, and some experts (block push)
fail often. Each episode is written whole (``add_episode``) once it has succeeded, so an interrupted run
leaves a valid store; its behaviour-mode label goes into ``.zattrs["episode_modes"]`` for the
mode-frequency metrics. Episode ``i`` of the run uses env seed ``seed * 1_000_000 + attempt``, stored per
episode in ``episode_seeds``, so any demonstration can be replayed.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED_STRIDE = 1_000_000


def add_arguments(p) -> None:
    p.add_argument("--env", required=True, help="multipath | blockpush | pusht_image | kitchen")
    p.add_argument("--episodes", type=int, required=True, help="number of successful episodes to collect")
    p.add_argument("--out", required=True, help="output dataset folder (D.zarr)")
    p.add_argument("--seed", type=int, default=0, help="base seed (env and expert); runs are reproducible")
    p.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="env constructor argument, value parsed as YAML (e.g. variant=zpaths, image_size=96); repeatable")
    p.add_argument("--append", action="store_true", help="append to an existing --out instead of refusing to touch it")
    p.add_argument("--max-attempts", type=int, default=None,
                   help="give up after this many expert episodes (default: 20 x --episodes)")
    p.add_argument("--action-noise", type=float, default=0.0, metavar="STD",
                   help="DART-style: execute the expert's action plus Gaussian noise of this std (action units) but "
                        "record the clean action, so demonstrations show recoveries from small errors (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_env_args(items: list[str]) -> dict:
    """``["k=v", ...]`` -> ``{k: yaml(v)}``."""
    import yaml

    from vqbet_core.errors import VqbetError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VqbetError(f"--env-arg expects KEY=VALUE, got '{item}'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise VqbetError(f"--env-arg {key}: value '{value}' is not a YAML scalar") from None
    return out


def _make_env(name: str, env_args: dict):
    from vqbet_core.errors import VqbetError
    from vqbet_core.sim import make_env

    try:
        return make_env(name, **env_args)
    except TypeError as exc:  # unknown / wrong keyword for the env's constructor
        raise VqbetError(f"--env-arg for env '{name}' not accepted: {exc}") from None


def _open_store(out: Path, append: bool, attrs: dict):
    """A new store, or (with --append) the existing one after checking it holds the same kind of data."""
    from vqbet_core.data.store import ZarrDataset
    from vqbet_core.errors import VqbetError

    if not out.exists():
        return ZarrDataset.create(out, {**attrs, "episode_modes": [], "episode_seeds": []})
    if not append:
        raise VqbetError(f"--out {out}: already exists (pass --append to add episodes to it, or choose a new path)")
    ds = ZarrDataset.open(out, mode="a")
    old = ds.attrs
    for key in ("source", "variant", "env_args"):
        before = old.get(key)
        if key == "env_args" and before is not None and attrs.get("env") == old.get("env"):
            from vqbet_core.sim import scene_args  # an older store recorded only the options given

            before = scene_args(attrs["env"], **before)
        if key in attrs and key in old and before != attrs[key]:
            raise VqbetError(f"--out {out}: holds {key}={old[key]!r}, cannot append episodes with {key}={attrs[key]!r}")
    modes = list(old.get("episode_modes", []))
    if len(modes) < ds.n_episodes:
        raise VqbetError(f"--out {out}: has {ds.n_episodes} episodes but only {len(modes)} episode_modes; cannot append")
    # a run killed between writing the label and committing its episode leaves one label too many
    ds.update_attrs({"episode_modes": modes[: ds.n_episodes],
                     "episode_seeds": list(old.get("episode_seeds", []))[: ds.n_episodes]})
    return ds


def _record_episode(env, expert, seed: int, keys: list[str], action_noise: float = 0.0):
    """One expert episode; returns (result, steps dict) - steps hold the obs before each action.

    With ``action_noise`` the env executes a perturbed action while the clean one is recorded (DART):
    the expert's next actions then label the way back from states a learned policy also drifts into."""
    import numpy as np

    obs = env.reset(seed=seed)
    expert.reset(env, np.random.default_rng([seed, 1]))
    noise = np.random.default_rng([seed, 2])
    steps: dict[str, list] = {k: [] for k in keys + ["action"]}
    marks: list[tuple[int, str]] = []  # (step, subtask) the env reported complete after that step's action
    for t in range(env.max_steps):
        action = np.asarray(expert.act(obs), np.float32)
        for k in keys:
            steps[k].append(np.asarray(obs[k]))
        steps["action"].append(action)
        if action_noise > 0:
            action = (action + noise.normal(0.0, action_noise, action.shape)).astype(np.float32)
        before = len(env.completed)
        obs, done = env.step(action)
        marks.extend((t, task) for task in env.completed[before:])
        if done:
            break
    episode = {k: np.stack(v) for k, v in steps.items()}
    if env.task_names:  # long-horizon env: the subtask being done at each step (DESIGN.md section 9)
        from vqbet_core.data.tasks import task_index_from_marks

        episode["task_index"] = task_index_from_marks(len(episode["action"]), marks, env.task_names)
    return env.result(), episode


def run(args) -> int:
    import shutil

    import numpy as np
    from tqdm.auto import tqdm

    from vqbet_core.errors import VqbetError
    from vqbet_core.sim.base import mode_frequencies

    if args.episodes < 1:
        raise VqbetError(f"--episodes must be >= 1, got {args.episodes}")
    max_attempts = args.max_attempts if args.max_attempts is not None else 20 * args.episodes
    if max_attempts < args.episodes:
        raise VqbetError(f"--max-attempts ({max_attempts}) must be >= --episodes ({args.episodes})")
    if args.seed < 0:
        raise VqbetError(f"--seed must be >= 0, got {args.seed}")
    if not args.action_noise >= 0:
        raise VqbetError(f"--action-noise must be a std >= 0, got {args.action_noise}")
    out = Path(args.out)
    if out.exists() and not args.append:
        raise VqbetError(f"--out {out}: already exists (pass --append to add episodes to it, or choose a new path)")
    from vqbet_core.sim import scene_args

    env_args = scene_args(args.env, **parse_env_args(args.env_arg))  # the whole scene, defaults included
    env = _make_env(args.env, env_args)
    created = not out.exists()
    ds = None
    try:
        attrs = {**env.dataset_attrs(), "env": args.env, "env_args": env_args}
        if args.action_noise:
            attrs["sim_demos_action_noise"] = float(args.action_noise)
        control_hz = float(attrs.get("control_hz") or 10.0)
        attrs["control_hz"] = attrs.get("control_hz") or control_hz
        ds = _open_store(out, args.append, attrs)
        # attempts already made per base seed: an --append run continues where the last one stopped
        attempts_by_seed = dict(ds.attrs.get("sim_demos_attempts", {}))
        first_attempt = int(attempts_by_seed.get(str(args.seed), 0))
        modes = list(ds.attrs.get("episode_modes", []))
        seeds = list(ds.attrs.get("episode_seeds", []))
        expert = env.make_expert()
        keys = env.obs_keys + env.image_keys
        run_modes: list = []
        attempts = 0
        bar = tqdm(total=args.episodes, desc=f"sim-demos {args.env}", unit="ep", dynamic_ncols=True,
                   disable=args.no_progress)
        try:
            while len(run_modes) < args.episodes:
                if attempts >= max_attempts:
                    raise VqbetError(
                        f"env '{args.env}': the expert succeeded in {len(run_modes)} of {attempts} attempts; gave up "
                        f"before collecting {args.episodes} episodes (raise --max-attempts or check the env args)")
                seed = args.seed * SEED_STRIDE + first_attempt + attempts
                attempts += 1
                result, episode = _record_episode(env, expert, seed, keys, args.action_noise)
                if result.success:
                    episode["timestamp"] = np.arange(len(episode["action"]), dtype=np.float64) / control_hz
                    # label first, then commit: a crash in between leaves a label too many (trimmed on --append)
                    modes.append(result.mode)
                    seeds.append(seed)
                    ds.update_attrs({"episode_modes": modes, "episode_seeds": seeds})
                    ds.add_episode(episode)
                    run_modes.append(result.mode)
                    bar.update(1)
                bar.set_postfix(attempts=attempts, success=f"{len(run_modes) / attempts:.2f}")
        finally:
            bar.close()
            attempts_by_seed[str(args.seed)] = first_attempt + attempts
            ds.update_attrs({"episode_modes": modes[: ds.n_episodes], "episode_seeds": seeds[: ds.n_episodes],
                             "sim_demos_attempts": attempts_by_seed})
    except BaseException:
        if created and (ds is None or ds.n_episodes == 0):  # leave no empty store behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        env.close()
    print(json.dumps({
        "env": args.env,
        "episodes": len(run_modes),
        "attempts": attempts,
        "expert_success_rate": len(run_modes) / attempts,
        "mode_freq": mode_frequencies(run_modes),
        "out": str(out),
        "total_episodes": ds.n_episodes,
    }))
    return 0
