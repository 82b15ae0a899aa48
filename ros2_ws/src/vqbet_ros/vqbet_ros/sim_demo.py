"""The end-to-end simulated demo: demonstrations -> VQ-BeT -> ONNX -> policy_node driving sim_robot_node over DDS.

``python -m vqbet_ros.sim_demo --out runs/sim_demo`` runs, on embedded defaults:

1. ``vqbet sim-demos --env blockpush --env-arg action_mode=target ...`` - the scripted expert pushing two blocks,
   recorded as a robot would be (``robot_joint`` = pusher xy, ``action`` = absolute joint targets, front camera);
   with ``--record`` the demonstrations come over ROS instead: ``scripted_teleop_node`` teleoperates
   ``sim_robot_node`` and ``recorder_node`` writes them (the record -> train path without hardware);
2. ``vqbet train --config blockpush_ros`` (pusher joints + camera, as the policy node provides them);
3. ``vqbet export`` (ONNX + model.yaml, parity checked);
4. ``sim_robot_node`` and ``policy_node`` as separate processes talking DDS on loopback (private
   ``ROS_DOMAIN_ID``, ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, and vqbet_bringup's Fast DDS profile
   ``config/fastdds_large_images.xml`` as the launch files use it, unless ``FASTRTPS_DEFAULT_PROFILES_FILE``
   is already set - set it empty to run without a profile); each evaluation episode is
   policy ``~/enable`` false -> simulator ``~/reset`` -> ``~/enable`` true -> wait for ``/sim/episode_result``;
5. one JSON line of metrics (the env's ``summarize`` plus ROS counters and stage timings) on stdout, and
   ``contact_sheet.png`` (camera frames of the first evaluation episode) in ``--out``.

Each stage is skipped when its output already exists (delete it, or ``--fresh``, to redo), so an
interrupted demo resumes. The helpers (:class:`NodeProcess`, :class:`SimSession`) are reused by the ROS tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from vqbet_core.errors import VqbetError

REPO = Path(__file__).resolve().parents[4]  # ros2_ws/src/vqbet_ros/vqbet_ros/ -> repository root
CALIBRATION = REPO / "calibration" / "blockpush_sim.yaml"
BRINGUP_CONFIG = REPO / "ros2_ws" / "src" / "vqbet_bringup" / "config"
# shared memory with a 16 MB segment: large camera frames skip the network path (see the file's comment)
DDS_PROFILE = BRINGUP_CONFIG / "fastdds_large_images.xml"

# Measured on 2 CPU cores (lightly loaded): 60 demos + blockpush_ros train in ~1.5 min, the whole demo in ~3-3.6 min
# (5.5 with the venv made); the policy reaches the first block (R1 1.0) but not the placement (P1 0): R2 0.0-0.17 on
# the papers' target layout (2026-12-03), 0.3-0.7 on the old random one. 150 demos and twice the training (17 min,
# random layout) gave the same picture (R1 1.0, R2 0.6, P1 0), as did 300 demos and twice the training on the papers'
# layout (5.5 min: R1 1.0, R2 0.15, P1 0 over 20 offline episodes), so more is not the default.
DEFAULTS = {
    "demos": 60,
    "episodes": 6,
    "image_size": 96,
    "max_steps": 200,
    "eval_seed": 1000,
    "config": "blockpush_ros",
}


def free_domain_id(low: int = 1, high: int = 99, probe_s: float = 0.5, tries: int = 5) -> int:
    """A random DDS domain in ``[low, high]`` where no other node shows up on this machine within ``probe_s``.

    Why probe: parallel test runs and demos on one machine each pick a random private domain, and two
    that pick the same one talk to each other's nodes (services of the same name included).
    """
    import rclpy

    domain = random.randint(low, high)
    for _ in range(tries):
        context = rclpy.Context()
        rclpy.init(context=context, domain_id=domain)
        node = rclpy.create_node("domain_probe", context=context)
        try:
            time.sleep(probe_s)
            busy = [n for n in node.get_node_names() if n != "domain_probe"]
        finally:
            node.destroy_node()
            rclpy.shutdown(context=context)
        if not busy:
            return domain
        domain = random.randint(low, high)
    return domain


def ros_env(domain_id: int | None = None) -> dict:
    """Environment for the node processes: a private DDS domain on loopback, vqbet_bringup's Fast DDS profile
    (unless ``FASTRTPS_DEFAULT_PROFILES_FILE`` is set already, if only to ''), unbuffered logs."""
    env = dict(os.environ)
    if "FASTRTPS_DEFAULT_PROFILES_FILE" not in env and DDS_PROFILE.exists():
        env["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(DDS_PROFILE)
    elif env.get("FASTRTPS_DEFAULT_PROFILES_FILE") == "":  # '': no profile (Fast DDS logs an error for an empty path)
        del env["FASTRTPS_DEFAULT_PROFILES_FILE"]
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"  # this process's own nodes (probe, session) too
    env["ROS_DOMAIN_ID"] = str(domain_id if domain_id is not None else free_domain_id())
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class NodeProcess:
    """One node as a real process (``python -m vqbet_ros.<module> --ros-args ...``), logging to a file."""

    def __init__(self, module: str, ros_args: list[str], env: dict, log_path: Path):
        self.module, self.log_path = module, Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", f"vqbet_ros.{module}", "--ros-args", *ros_args],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (the nodes shut down cleanly on it), then SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            if self.wait(timeout) is None:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


class SimSession:
    """This process's own ROS node: drives episodes through the services and watches the topics.

    Collects episode results, trajectories sent to the controller (count, last time), joint states and,
    when ``keep_frames`` is set, the camera frames of the episode being watched.
    """

    def __init__(self, domain_id: int, sim_node: str = "/sim_robot_node", policy_node: str = "/policy_node",
                 camera_topic: str = "/camera/image_raw"):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("sim_demo_session", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.sim_node, self.policy_node = sim_node.rstrip("/"), policy_node.rstrip("/")
        self.lock = threading.Lock()
        self.results: list[dict] = []
        self.trajectories: list[tuple[float, object]] = []
        self.joint_states: list[tuple[float, list[str], np.ndarray]] = []
        self.teleop: list[tuple[int, list[str], np.ndarray]] = []
        self.frames: list[np.ndarray] = []
        self.diagnostics: dict[str, dict] = {}  # latest key/values per status name
        self.keep_frames = False
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(String, "/sim/episode_result", self._on_result, QoSProfile(
            depth=50, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.node.create_subscription(JointTrajectory, "/arm_controller/joint_trajectory",
                                      lambda m: self._append(self.trajectories, (time.time(), m)), reliable)
        self.node.create_subscription(JointState, "/joint_states", self._on_joint_state, reliable)
        self.teleop_sub = self.node.create_subscription(JointState, "/teleop/joint_command", self._on_teleop, reliable)
        self.node.create_subscription(Image, camera_topic, self._on_image, reliable)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 20)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set():
            self.executor.spin_once(timeout_sec=0.02)

    def _append(self, target: list, item) -> None:
        with self.lock:
            target.append(item)

    def _on_result(self, msg) -> None:
        self._append(self.results, json.loads(msg.data))

    def _on_joint_state(self, msg) -> None:
        self._append(self.joint_states, (time.time(), list(msg.name), np.asarray(msg.position, np.float64)))

    def _on_teleop(self, msg) -> None:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        self._append(self.teleop, (stamp, list(msg.name), np.asarray(msg.position, np.float64)))

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            self.diagnostics[status.name] = {kv.key: kv.value for kv in status.values}

    def node_diagnostics(self, prefix: str) -> dict:
        """Latest ``/diagnostics`` values of the status whose name starts with ``prefix`` (e.g. ``sim_robot_node``)."""
        return next((v for k, v in self.diagnostics.items() if k.startswith(prefix)), {})

    def _on_image(self, msg) -> None:
        if self.keep_frames:
            from vqbet_ros import ros_convert

            self._append(self.frames, ros_convert.image_to_rgb(msg))

    # -------------------------------------------------------------- services
    def call(self, srv_type, name: str, request, timeout: float = 20.0):
        client = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise VqbetError(f"service {name} did not come up within {timeout:g} s")
            future = client.call_async(request)
            end = time.monotonic() + timeout
            while not future.done() and time.monotonic() < end:
                time.sleep(0.01)
            if not future.done():
                raise VqbetError(f"service {name}: no answer within {timeout:g} s")
            return future.result()
        finally:
            self.node.destroy_client(client)

    def reset(self) -> dict:
        from std_srvs.srv import Trigger

        response = self.call(Trigger, f"{self.sim_node}/reset", Trigger.Request())
        if not response.success:
            raise VqbetError(f"{self.sim_node}/reset failed: {response.message}")
        return json.loads(response.message)

    def enable(self, on: bool) -> str:
        from std_srvs.srv import SetBool

        response = self.call(SetBool, f"{self.policy_node}/enable", SetBool.Request(data=bool(on)))
        if not response.success:
            raise VqbetError(f"{self.policy_node}/enable {on}: {response.message}")
        return response.message

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.02)
        raise VqbetError(f"timed out after {timeout:g} s waiting for {what}")

    def policy_has_inputs(self) -> bool:
        """The policy node's latest ``/diagnostics`` show every input stream (cameras, joint states) arriving.

        A node that has just started answers its services before DDS has matched its subscriptions to the
        simulator's publishers; enabling it then loses the episode's first steps to "no image yet".
        """
        values = self.node_diagnostics(self.policy_node.split("/")[-1] + ":")
        rates = [v for k, v in values.items() if k.startswith("rate_") and k.endswith("_hz")]
        return bool(rates) and all(float(r) > 0 for r in rates)

    def run_episode(self, timeout: float, frames: bool = False) -> dict:
        """Disable the policy, wait until it receives its inputs, reset the simulator, enable the policy, wait
        for the episode's result."""
        self.enable(False)
        self.wait_for(self.policy_has_inputs, timeout, f"{self.policy_node} to receive camera images and joint states")
        self.keep_frames = False
        with self.lock:
            self.frames = []
        started = self.reset()
        self.keep_frames = frames
        n_traj = len(self.trajectories)
        self.enable(True)
        episode = started["episode"]
        self.wait_for(lambda: any(r["episode"] == episode for r in self.results), timeout,
                      f"the result of episode {episode}")
        self.keep_frames = False
        result = next(r for r in self.results if r["episode"] == episode)
        result["trajectories"] = len(self.trajectories) - n_traj
        return result

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.context)


# ---------------------------------------------------------------------- stages
def sim_args(image_size: int, max_steps: int) -> str:
    return f"{{action_mode: target, image_size: {image_size}, max_steps: {max_steps}}}"


def vqbet(*args: str) -> None:
    """One ``vqbet`` subcommand in its own process (its output streams through); failure -> VqbetError."""
    cmd = [sys.executable, "-m", "vqbet_core", *args]
    print(f"$ vqbet {' '.join(args)}", file=sys.stderr, flush=True)
    code = subprocess.call(cmd, stdout=sys.stderr)
    if code:
        raise VqbetError(f"vqbet {args[0]} failed with exit status {code} (see its output above)")


def sim_robot_args(image_size: int, max_steps: int, seed: int, autostart: bool = False) -> list[str]:
    return ["--params-file", str(BRINGUP_CONFIG / "sim.yaml"), "-p", f"env_args:='{sim_args(image_size, max_steps)}'",
            "-p", f"seed:={seed}", "-p", f"autostart:={str(autostart).lower()}", "-p", "auto_reset:=false"]


def policy_args(model: Path, calibration: Path, enabled: bool = False, threads: int = 1) -> list[str]:
    return ["--params-file", str(BRINGUP_CONFIG / "policy.yaml"), "--params-file", str(BRINGUP_CONFIG / "sim.yaml"),
            "-p", f"model:={model}", "-p", f"calibration:={calibration}", "-p", f"enabled:={str(enabled).lower()}",
            "-p", f"threads:={threads}"]


def record_demos(out: Path, episodes: int, image_size: int, max_steps: int, logs: Path) -> dict:
    """Demonstrations over ROS: scripted_teleop_node teleoperates sim_robot_node, recorder_node writes ``out``."""
    env = ros_env()
    procs = []
    try:
        procs.append(NodeProcess("sim_robot_node", sim_robot_args(image_size, max_steps, seed=0), env,
                                 logs / "record_sim_robot_node.log"))
        procs.append(NodeProcess("recorder_node", [
            "--params-file", str(BRINGUP_CONFIG / "recorder.yaml"), "-p", f"output:={out}",
            "-p", f"calibration:={CALIBRATION}", "-p", "min_free_mb:=50.0", "-p", "stop_free_mb:=20.0"],
            env, logs / "record_recorder_node.log"))
        teleop = NodeProcess("scripted_teleop_node", [
            "--params-file", str(BRINGUP_CONFIG / "sim.yaml"), "-p", "recorder:=/recorder_node",
            "-p", f"episodes:={episodes}", "-p", "exit_when_done:=true",
            "-p", f"env_args:='{{action_mode: target, max_steps: {max_steps}}}'"], env, logs / "record_teleop.log")
        procs.append(teleop)
        limit = 60 + episodes * 3 * max_steps / 10.0
        if teleop.wait(limit) is None:
            raise VqbetError(f"recording {episodes} episodes took longer than {limit:g} s (logs in {logs})")
        if teleop.proc.returncode:
            raise VqbetError(f"scripted_teleop_node failed: {teleop.log_tail(500)}")
    finally:
        for p in reversed(procs):
            p.stop()
    from vqbet_core.data.store import ZarrDataset

    ds = ZarrDataset.open(out, "r")
    return {"episodes": ds.n_episodes, "steps": ds.n_steps}


def evaluate_over_ros(model: Path, episodes: int, image_size: int, max_steps: int, seed: int, logs: Path,
                      sheet: Path | None, calibration: Path = CALIBRATION,
                      policy_params: dict | None = None) -> tuple[list[dict], dict]:
    """sim_robot_node + policy_node as processes; ``episodes`` episodes driven through the services.

    ``policy_params``: extra policy_node parameters (``name: value``, e.g. ``{"blend": "none"}``)."""
    env = ros_env()
    procs = []
    session = None
    extra = [a for k, v in (policy_params or {}).items()
             for a in ("-p", f"{k}:={str(v).lower() if isinstance(v, bool) else v}")]
    try:
        procs.append(NodeProcess("sim_robot_node", sim_robot_args(image_size, max_steps, seed), env,
                                 logs / "sim_robot_node.log"))
        procs.append(NodeProcess("policy_node", policy_args(model, calibration) + extra, env,
                                 logs / "policy_node.log"))
        session = SimSession(int(env["ROS_DOMAIN_ID"]))
        results = []
        timeout = 30 + 3 * max_steps / 10.0
        for ep in range(episodes):
            for p in procs:
                if not p.alive():
                    raise VqbetError(f"{p.module} exited: {p.log_tail(800)}")
            t0 = time.monotonic()
            r = session.run_episode(timeout, frames=(ep == 0 and sheet is not None))
            r["wall_s"] = round(time.monotonic() - t0, 2)
            results.append(r)
            print(f"episode {ep + 1}/{episodes}: success {r['success']}, mode {r['mode']}, {r['length']} steps, "
                  f"{r['trajectories']} trajectories, {r['wall_s']} s", file=sys.stderr, flush=True)
            if ep == 0 and sheet is not None and session.frames:
                from vqbet_core.evaluate import contact_sheet

                contact_sheet(list(session.frames), sheet)
        session.enable(False)
        time.sleep(1.2)  # one more /diagnostics period, so the counters cover the last episode
        sim = session.node_diagnostics("sim_robot_node")
        policy = session.node_diagnostics("policy_node")
        stats = {"sim_robot_node": {k: sim.get(k) for k in ("steps", "trajectories", "rejected", "stale_commands",
                                                             "missed_ticks")},
                 "policy_node": {k: policy.get(k) for k in ("published", "late_chunks", "rejected_outputs",
                                                            "skipped_steps", "dropped_past_points",
                                                            "latency_p50_ms", "latency_p99_ms")}}
        return results, stats
    finally:
        if session is not None:
            session.close()
        for p in reversed(procs):
            p.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqbet_ros.sim_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/sim_demo", help="output folder (dataset, run, model, logs, contact sheet)")
    p.add_argument("--demos", type=int, default=DEFAULTS["demos"], help="expert demonstrations to collect")
    p.add_argument("--episodes", type=int, default=DEFAULTS["episodes"], help="evaluation episodes over ROS")
    p.add_argument("--config", default=DEFAULTS["config"], help="training config (named or a YAML path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    p.add_argument("--image-size", type=int, default=DEFAULTS["image_size"])
    p.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"], help="env steps per episode")
    p.add_argument("--seed", type=int, default=DEFAULTS["eval_seed"], help="env seed of the first evaluation episode")
    p.add_argument("--record", action="store_true",
                   help="collect the demonstrations over ROS (scripted_teleop_node + recorder_node) instead of sim-demos")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except VqbetError as exc:
        print(f"sim_demo: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    for name in ("demos", "episodes", "max_steps"):
        if getattr(args, name) < 1:
            raise VqbetError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 16:
        raise VqbetError(f"--image-size must be >= 16, got {args.image_size}")
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    timing: dict[str, float] = {}
    t_all = time.monotonic()
    data = out / ("recorded.zarr" if args.record else "demos.zarr")
    t0 = time.monotonic()
    if not (data / "meta").exists():
        shutil.rmtree(data, ignore_errors=True)
        if args.record:
            record_demos(data, args.demos, args.image_size, args.max_steps, logs)
        else:
            vqbet("sim-demos", "--env", "blockpush", "--episodes", str(args.demos), "--out", str(data), "--seed", "0",
                  "--env-arg", "action_mode=target", "--env-arg", f"image_size={args.image_size}",
                  "--env-arg", f"max_steps={args.max_steps}", "--no-progress")
    timing["demos"] = time.monotonic() - t0
    run, model = out / "run", out / "model"
    t0 = time.monotonic()
    if not (model / "model.yaml").exists():
        sets = [a for s in args.set for a in ("--set", s)]
        vqbet("train", "--config", args.config, "--data", str(data), "--out", str(run), "--no-progress", *sets)
        timing["train"] = time.monotonic() - t0
        t0 = time.monotonic()
        vqbet("export", "--checkpoint", str(run), "--out", str(model), "--parity-steps", "8")
        timing["export"] = time.monotonic() - t0
    t0 = time.monotonic()
    sheet = out / "contact_sheet.png"
    results, stats = evaluate_over_ros(model.resolve(), args.episodes, args.image_size, args.max_steps, args.seed,
                                       logs, sheet)
    timing["rollouts_over_ros"] = time.monotonic() - t0
    timing["total"] = time.monotonic() - t_all

    from vqbet_core.data.store import ZarrDataset
    from vqbet_core.sim.base import EpisodeResult
    from vqbet_core.sim.blockpush import BlockPushEnv

    demo_modes = ZarrDataset.open(data, "r").attrs.get("episode_modes") or None
    episode_results = [EpisodeResult(bool(r["success"]), r["mode"], int(r["length"]), r["info"]) for r in results]
    metrics = BlockPushEnv.summarize(episode_results, demo_modes)
    metrics.update({"env": "blockpush", "loop": "ros2 (sim_robot_node + policy_node over DDS)",
                    "demos": "recorded over ROS" if args.record else "vqbet sim-demos",
                    "mean_trajectories_per_episode": float(np.mean([r["trajectories"] for r in results])),
                    "mean_length": float(np.mean([r["length"] for r in results])),
                    "ros": stats, "contact_sheet": str(sheet) if sheet.exists() else None, "model": str(model),
                    "timing_s": {k: round(v, 1) for k, v in timing.items()}})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
