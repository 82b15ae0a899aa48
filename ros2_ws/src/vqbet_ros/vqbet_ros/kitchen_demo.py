"""The main job over ROS 2: a goal-conditioned image policy runs operator-ordered kitchen sequences.

``python -m vqbet_ros.kitchen_demo`` (``make demo``) starts ``sim_robot_node`` (MuJoCo Franka Kitchen as a
robot: 9 Panda joints, the 96x96 camera, ``calibration/franka_sim.yaml``) and ``policy_node`` with the shipped
model (``models/kitchen_image_goal``) as separate processes on loopback DDS, and for each episode:

1. sets the policy's ``task_sequence`` parameter to the requested order (the first default is microwave ->
   slide cabinet -> hinge cabinet -> light switch, then random orders of 4 of the 5 subtasks, drawn from the
   episode's env seed exactly as ``vqbet eval --task-sequence random`` draws them);
2. ``~/enable`` false -> simulator ``~/reset`` (the next env seed) -> ``~/enable`` true;
3. the node advances the goal on its own completion score (``~/sequence_status``) and disables itself after
   the last subtask; the episode ends then (plus a short hold) or when the simulator's episode ends;
4. the simulator's ground-truth completions (``/sim/subtasks``, never seen by the policy) give the subtasks
   done in the requested order - the papers' conditional kitchen metric, counted as ``vqbet eval`` counts it.

Time: by default the simulator runs in lockstep on ROS time (``sim_robot_node`` publishes ``/clock``, the
policy node runs on ``use_sim_time``): a tick waits for its command, so a slow computer stretches the clock
instead of losing steps and the figures are the model's, not the CPU's. ``--realtime`` runs on the wall clock
as a robot does, and the simulator's ``missed_ticks`` and the node's ``late_chunks`` say what was lost.

One line per episode, one JSON line at the end (``in_order_mean``, per-episode results, ROS counters: the
simulator's missed control ticks and the node's skipped steps), ``contact_sheet.png`` of the first episode.
``--offline`` also rolls out the same model, seeds and orders offline (``vqbet eval --model``) and reports
both means: the deployment's parity figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vqbet_core.errors import VqbetError
from vqbet_ros.sim_demo import BRINGUP_CONFIG, REPO, NodeProcess, SimSession, ros_env

MODEL = REPO / "models" / "kitchen_image_goal"
CALIBRATION = REPO / "calibration" / "franka_sim.yaml"
FIRST_SEQUENCE = ("microwave", "slide cabinet", "hinge cabinet", "light switch")
DEFAULTS = {"episodes": 6, "seed": 1000, "hold_s": 1.0}


def in_order(requested: list[str], completed: list[str]) -> int:
    """Requested subtasks done in the requested order, from the first until one is missing or out of order
    (the count ``vqbet_core.evaluate.run_sequence_episode`` makes)."""
    n = 0
    for want, got in zip(requested, completed):
        if want != got:
            break
        n += 1
    return n


def scene_of(model: Path) -> dict:
    """The kitchen scene the model's demonstrations were recorded in (model.yaml's dataset attrs)."""
    import yaml

    from vqbet_core.evaluate import evaluation_scene

    meta = yaml.safe_load((model / "model.yaml").read_text())
    scene, notices = evaluation_scene("kitchen", meta.get("dataset_attrs") or {}, {})
    for line in notices:
        print(f"kitchen_demo: {line}", file=sys.stderr)
    if not scene.get("image_size"):
        raise VqbetError(f"{model}: the model's demonstrations have no camera (image_size), expected an image model")
    return scene


def requested_orders(scene: dict, seeds: list[int], first: tuple[str, ...] | None) -> list[list[str]]:
    """The order asked for in each episode: ``first`` for the first one (if given), then the random order
    ``vqbet eval --task-sequence random`` draws from the same env seed."""
    from vqbet_core.evaluate import SequenceSpec
    from vqbet_core.sim import make_env

    env = make_env("kitchen", **{**scene, "image_size": None})
    try:
        orders = [SequenceSpec("random").requested(env, s) for s in seeds]
    finally:
        env.close()
    if first:
        orders[0] = list(first)
    return orders


class SequenceSession(SimSession):
    """:class:`SimSession` plus the simulator's subtask completions and the policy's sequence status."""

    def __init__(self, domain_id: int):
        super().__init__(domain_id)
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.subtasks: list[dict] = []
        self.status: list[dict] = []
        self.node.create_subscription(String, "/sim/subtasks", lambda m: self._append(self.subtasks, json.loads(m.data)),
                                      reliable)
        self.node.create_subscription(String, f"{self.policy_node}/sequence_status",
                                      lambda m: self._append(self.status, json.loads(m.data)), reliable)

    def set_sequence(self, names: list[str]) -> None:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        request = SetParameters.Request(parameters=[
            Parameter("task_sequence", Parameter.Type.STRING_ARRAY, list(names)).to_parameter_msg()])
        result = self.call(SetParameters, f"{self.policy_node}/set_parameters", request).results[0]
        if not result.successful:
            raise VqbetError(f"{self.policy_node}: task_sequence {names} refused: {result.reason}")

    def completed(self, episode: int) -> list[str]:
        with self.lock:
            msgs = [m for m in self.subtasks if m["episode"] == episode]
        return list(msgs[-1]["completed"]) if msgs else []

    def run_sequence(self, requested: list[str], timeout: float, hold_s: float, frames: bool) -> dict:
        """One episode asked for ``requested``; ends when the node finished the sequence (+``hold_s``) or the
        simulator's episode ends."""
        self.enable(False)
        self.set_sequence(requested)
        self.wait_for(self.policy_has_inputs, timeout, f"{self.policy_node} to receive camera images and joint states")
        with self.lock:
            self.frames = []
            n_status = len(self.status)
        self.keep_frames = False
        started = self.reset()
        episode = started["episode"]
        self.keep_frames = frames
        n_traj = len(self.trajectories)
        self.enable(True)
        t0 = time.monotonic()

        def finished() -> dict | None:
            with self.lock:
                return next((s for s in self.status[n_status:] if s["finished"] and s["task_sequence"] == requested),
                            None)

        def sim_ended() -> dict | None:
            with self.lock:
                return next((r for r in self.results if r["episode"] == episode), None)

        self.wait_for(lambda: finished() or sim_ended(), timeout, f"episode {episode} to finish")
        ended_by = "sequence done" if finished() else "episode end"
        if ended_by == "sequence done":
            time.sleep(hold_s)  # the last subtask registers on the tick after the node's last advance
        self.keep_frames = False
        status = finished() or (self.status[-1] if len(self.status) > n_status else {})
        completed = self.completed(episode)
        return {"episode": episode, "seed": started["seed"], "requested": requested, "completed": completed,
                "in_order": in_order(requested, completed), "ended_by": ended_by,
                "wall_s": round(time.monotonic() - t0, 2), "trajectories": len(self.trajectories) - n_traj,
                # the node's advances: the subtask it left, by whom, when (s into the episode, on the node's clock:
                # the simulator's, in lockstep and in real time alike)
                "advances": [{"subtask": a["subtask"], "by": a["by"], "at_s": round(a["stamp"] - started["start"], 2)}
                             for a in status.get("advances", [])]}


def _number(value: str | None) -> float | None:
    """A /diagnostics value (a string) as a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def sim_args(scene: dict, seed: int, lockstep: bool) -> list[str]:
    env_args = json.dumps({k: v for k, v in scene.items() if v is not None})
    return ["--params-file", str(BRINGUP_CONFIG / "sim.yaml"), "-p", "env:=kitchen", "-p", f"env_args:='{env_args}'",
            "-p", f"seed:={seed}", "-p", "autostart:=false", "-p", "auto_reset:=false",
            "-p", f"lockstep:={str(lockstep).lower()}"]


def policy_args(model: Path, threads: int, lockstep: bool) -> list[str]:
    return ["--params-file", str(BRINGUP_CONFIG / "policy.yaml"), "--params-file", str(BRINGUP_CONFIG / "sim.yaml"),
            "-p", f"model:={model}", "-p", f"calibration:={CALIBRATION}", "-p", "enabled:=false",
            "-p", f"threads:={threads}", "-p", f"use_sim_time:={str(lockstep).lower()}"]


def run_over_ros(model: Path, orders: list[list[str]], seed: int, scene: dict, logs: Path, sheet: Path | None,
                 hold_s: float, lockstep: bool = True, threads: int = 1) -> tuple[list[dict], dict]:
    env = ros_env()
    procs, session = [], None
    max_steps = int(scene.get("max_steps") or 560)
    try:
        procs.append(NodeProcess("sim_robot_node", sim_args(scene, seed, lockstep), env, logs / "sim_robot_node.log"))
        procs.append(NodeProcess("policy_node", policy_args(model, threads, lockstep), env, logs / "policy_node.log"))
        session = SequenceSession(int(env["ROS_DOMAIN_ID"]))
        results = []
        timeout = 60 + 2 * max_steps / 12.5
        for i, requested in enumerate(orders):
            for p in procs:
                if not p.alive():
                    raise VqbetError(f"{p.module} exited: {p.log_tail(800)}")
            r = session.run_sequence(requested, timeout, hold_s, frames=(i == 0 and sheet is not None))
            results.append(r)
            when = ", ".join(f"{a['subtask']} at {a['at_s']:.1f} s" for a in r["advances"])
            print(f"episode {i + 1}/{len(orders)} (seed {r['seed']}): asked {' > '.join(requested)}; done "
                  f"{' > '.join(r['completed']) or 'nothing'}: {r['in_order']}/{len(requested)} in order "
                  f"({r['ended_by']}, {r['wall_s']} s{'; the node moved on from ' + when if when else ''})",
                  file=sys.stderr, flush=True)
            if i == 0 and sheet is not None and session.frames:
                from vqbet_core.evaluate import contact_sheet

                contact_sheet(list(session.frames), sheet)
        session.enable(False)
        time.sleep(1.2)  # one more /diagnostics period, so the counters cover the last episode
        sim, policy = session.node_diagnostics("sim_robot_node"), session.node_diagnostics("policy_node")
        stats = {"sim_robot_node": {k: _number(sim.get(k)) for k in ("steps", "trajectories", "rejected", "missed_ticks",
                                                                     "lockstep_waits", "lockstep_timeouts")},
                 "policy_node": {k: _number(policy.get(k)) for k in ("published", "late_chunks", "skipped_steps",
                                                                     "latency_p50_ms", "latency_p99_ms")}}
        return results, stats
    finally:
        if session is not None:
            session.close()
        for p in reversed(procs):
            p.stop()


def run_offline(model: Path, episodes: int, seed: int, out: Path) -> dict:
    """``vqbet eval --model`` on the same seeds with random orders (the ROS run's orders when it used no fixed
    first sequence)."""
    cmd = [sys.executable, "-m", "vqbet_core", "eval", "--model", str(model), "--env", "kitchen",
           "--episodes", str(episodes), "--seed", str(seed), "--task-sequence", "random", "--advance", "model",
           "--workers", "1"]
    print(f"$ vqbet {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out / "offline_eval.log").write_text(done.stderr)
    if done.returncode:
        raise VqbetError(f"vqbet eval failed ({done.returncode}): {done.stderr[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqbet_ros.kitchen_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL), help="exported goal-conditioned image model folder")
    p.add_argument("--out", default="runs/kitchen_demo", help="output folder (logs, contact sheet, metrics.json)")
    p.add_argument("--episodes", type=int, default=DEFAULTS["episodes"], help="sequences to run over ROS")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="env seed of the first episode (then +1)")
    p.add_argument("--sequence", default=",".join(FIRST_SEQUENCE),
                   help="the first episode's order (comma-separated subtasks; 'random' = drawn from its seed)")
    p.add_argument("--offline", action="store_true",
                   help="also roll out the same model, seeds and random orders offline (vqbet eval --model): parity")
    p.add_argument("--max-steps", type=int, default=None, help="env steps per episode (default: the scene's, 560)")
    p.add_argument("--realtime", action="store_true",
                   help="run the simulator on the wall clock (missed ticks and late chunks count) instead of in "
                        "lockstep on ROS time (/clock: a slow step stretches the clock, as offline)")
    p.add_argument("--hold", type=float, default=DEFAULTS["hold_s"], help="s to hold after the sequence is done")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except VqbetError as exc:
        print(f"kitchen_demo: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.episodes < 1:
        raise VqbetError(f"--episodes must be >= 1, got {args.episodes}")
    model = Path(args.model).resolve()
    if not (model / "model.yaml").exists():
        raise VqbetError(f"--model {args.model}: no model.yaml there (expected an exported model folder)")
    from vqbet_core.runtime.spec import load_spec

    spec = load_spec(model)
    if not spec.goal_dim or not spec.completion_horizon:
        raise VqbetError(f"--model {args.model}: expected a goal-conditioned model with a completion head")
    first = None if args.sequence == "random" else tuple(s.strip() for s in args.sequence.split(","))
    if first and [n for n in first if n not in spec.goal_names]:
        raise VqbetError(f"--sequence: unknown subtasks {[n for n in first if n not in spec.goal_names]} "
                         f"(the model knows {spec.goal_names})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scene = scene_of(model)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise VqbetError(f"--max-steps must be >= 1, got {args.max_steps}")
        scene["max_steps"] = args.max_steps
    seeds = [args.seed + i for i in range(args.episodes)]
    orders = requested_orders(scene, seeds, first)
    t0 = time.monotonic()
    sheet = out / "contact_sheet.png"
    results, stats = run_over_ros(model, orders, args.seed, scene, out / "logs", sheet, args.hold,
                                  lockstep=not args.realtime)
    metrics = {"env": "kitchen", "loop": "ros2 (sim_robot_node + policy_node over DDS)", "model": str(model),
               "clock": "wall (real time)" if args.realtime else "ROS time from sim_robot_node (lockstep)",
               "episodes": len(results), "sequence_length": len(orders[0]),
               "in_order_mean": float(np.mean([r["in_order"] for r in results])),
               "all_done": float(np.mean([r["in_order"] == len(r["requested"]) for r in results])),
               "results": results, "ros": stats, "contact_sheet": str(sheet) if sheet.exists() else None,
               "wall_s": round(time.monotonic() - t0, 1)}
    if args.offline:
        if first:
            print("kitchen_demo: note: the offline run asks random orders for every episode; the ROS run's first "
                  "episode asked a fixed one (--sequence random for a like-for-like comparison)", file=sys.stderr)
        offline = run_offline(model, args.episodes, args.seed, out)
        metrics["offline"] = {k: offline.get(k) for k in ("in_order_mean", "completion_precision", "completion_recall",
                                                          "completion_delay_mean_steps", "episodes")}
        metrics["ros_minus_offline"] = round(metrics["in_order_mean"] - offline["in_order_mean"], 3)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
