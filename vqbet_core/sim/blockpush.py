"""Two-block push (the BeT / IBC multimodal block-push task) in pybullet, with a planar pusher.

Why a pusher instead of the xArm: the task's difficulty and multimodality live in the table plane
(which block first, which target each block goes to); a cylinder driven by a force-limited
constraint gives the same 2D displacement action space without inverse kinematics, and steps in
~1 ms. The 16-d state and the block randomisation follow IBC's ``BlockPushMultimodal``: blocks at
x = 0.4 +- 0.1, y = -0.2 +- 0.15 (at least 0.1 apart in x), the effector starting at (0.3, -0.4).
Targets (``target_layout``): ``"paper"`` (default) is the benchmark the BeT and VQ-BeT papers report
on (BeT's fork of the env): two target slots at x = 0.4 -+ 0.12, y = 0.2, each jittered by +- 5 mm in x
and +- 7.5 mm in y, yaw pi +- pi/30, which target takes which slot drawn per episode. ``"random"`` is
IBC's original: each target anywhere in x = 0.4 +- 0.1, y = 0.2 +- 0.15 (0.12 apart in x), yaw
pi +- pi/6, a harder task than the one the papers' numbers are for.

Metrics (BeT paper, Table 1/2): R1/R2 = the pusher touched at least one / both blocks; P1/P2 = at
the end of the episode at least one block / both blocks sit in (distinct) targets (block centre
within ``goal_tolerance`` of the target centre). The mode label is read from what happened, so
policy rollouts get one too: blocks that end in a target, ordered by when they entered it, e.g.
``"b0->t1,b1->t0"``.

Robot view (``action_mode="target"``): the pusher is a planar gantry with joints ``pusher_x`` and
``pusher_y``; the action is the absolute pusher target (the joint position targets a trajectory
controller receives) and the observation gains ``robot_joint`` (the measured pusher xy). The default
``"delta"`` keeps the original displacement action. Both modes move the pusher identically (targets are
reached at most ``MAX_STEP`` per control step), so a target-mode dataset deploys through the ROS policy
node and ``sim_robot_node`` unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np

from vqbet_core.errors import VqbetError
from vqbet_core.sim.base import EpisodeResult, Expert, SimEnv, mode_frequencies

BLOCK_SIZE = 0.04  # cube side (m)
PUSHER_RADIUS = 0.0125
TARGET_SIZE = 0.1  # side of the (visual only) target squares
WORKSPACE = np.array([[0.15, -0.5], [0.7, 0.5]])  # effector target bounds, IBC's WORKSPACE_BOUNDS
EFFECTOR_START = np.array([0.3, -0.4])
MAX_STEP = 0.03  # max effector displacement per control step (0.3 m/s at 10 Hz)
SIM_HZ = 240
BLOCK_COLORS = [(0.85, 0.15, 0.15, 1.0), (0.15, 0.65, 0.2, 1.0)]  # b0 red, b1 green
TARGET_COLORS = [(1.0, 0.6, 0.6, 1.0), (0.6, 0.95, 0.6, 1.0)]  # t0 pale red, t1 pale green
JOINT_NAMES = ["pusher_x", "pusher_y"]
ACTION_MODES = ("delta", "target")
TARGET_LAYOUTS = ("paper", "random")
MODES = ["b0->t0,b1->t1", "b0->t1,b1->t0", "b1->t0,b0->t1", "b1->t1,b0->t0"]
STATE_LAYOUT = [
    ("block0_xy", 2), ("block0_yaw", 1), ("block1_xy", 2), ("block1_yaw", 1),
    ("effector_xy", 2), ("effector_target_xy", 2),
    ("target0_xy", 2), ("target0_yaw", 1), ("target1_xy", 2), ("target1_yaw", 1),
]
# ``relative_features=True`` appends these (the same quantities, as differences the policy need not learn to form)
RELATIVE_LAYOUT = [
    ("block0_minus_target0_xy", 2), ("block0_minus_target1_xy", 2), ("block1_minus_target0_xy", 2),
    ("block1_minus_target1_xy", 2), ("effector_minus_block0_xy", 2), ("effector_minus_block1_xy", 2),
]


@contextlib.contextmanager
def _c_stdout_to_stderr():
    """Send what C libraries write to file descriptor 1 to stderr meanwhile (Python's ``sys.stdout`` is untouched)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _wrap_cube_yaw(yaw: float) -> float:
    """A cube looks the same every 90 degrees: report yaw in [-pi/4, pi/4)."""
    return float((yaw + math.pi / 4) % (math.pi / 2) - math.pi / 4)


class BlockPushEnv(SimEnv):
    """Push two blocks into two target squares, any assignment (4 expert modes)."""

    name = "blockpush"
    joint_names = JOINT_NAMES
    values_before_option = {"target_layout": "random"}  # demos recorded before the papers' layout existed

    def __init__(self, image_size: int | None = None, max_steps: int = 350, control_hz: float = 10.0,
                 goal_tolerance: float = 0.05, render_size: int = 256, action_mode: str = "delta",
                 relative_features: bool = False, effector_target_in_state: bool = True,
                 target_layout: str = "paper"):
        if action_mode not in ACTION_MODES:
            raise VqbetError(f"blockpush action_mode={action_mode!r}: expected one of {list(ACTION_MODES)}")
        if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 16):
            raise VqbetError(f"blockpush image_size={image_size!r}: expected an integer >= 16 or None")
        if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
            raise VqbetError(f"blockpush max_steps={max_steps!r}: expected a positive integer")
        if not control_hz or control_hz <= 0 or SIM_HZ % control_hz:
            raise VqbetError(f"blockpush control_hz={control_hz!r}: expected a positive divisor of {SIM_HZ}")
        if not 0 < goal_tolerance < 0.2:
            raise VqbetError(f"blockpush goal_tolerance={goal_tolerance!r}: expected metres in (0, 0.2)")
        if not isinstance(relative_features, (bool, np.bool_)):
            raise VqbetError(f"blockpush relative_features={relative_features!r}: expected true or false")
        if not isinstance(effector_target_in_state, (bool, np.bool_)):
            raise VqbetError(f"blockpush effector_target_in_state={effector_target_in_state!r}: expected true or false")
        if target_layout not in TARGET_LAYOUTS:
            raise VqbetError(f"blockpush target_layout={target_layout!r}: expected one of {list(TARGET_LAYOUTS)}")
        import pybullet
        from pybullet_utils import bullet_client

        self._pb_module = pybullet
        with _c_stdout_to_stderr():  # pybullet's C code prints "argv[0]=" on connect; stdout carries JSON results
            self.client = bullet_client.BulletClient(connection_mode=pybullet.DIRECT)
        self.image_size = None if image_size is None else int(image_size)
        self.render_size = int(render_size)
        self._max_steps = int(max_steps)
        self.control_hz = float(control_hz)
        self.goal_tolerance = float(goal_tolerance)
        self.substeps = int(SIM_HZ // control_hz)
        self.action_mode = action_mode
        self.action_is_joint_target = action_mode == "target"
        self.relative_features = bool(relative_features)
        self.effector_target_in_state = bool(effector_target_in_state)
        self.target_layout = target_layout
        self._rng = np.random.default_rng()
        self._t = 0
        self._ids: dict = {}

    # ------------------------------------------------------------------ interface
    @property
    def obs_keys(self) -> list[str]:
        return ["state", "robot_joint"] if self.action_is_joint_target else ["state"]

    @property
    def image_keys(self) -> list[str]:
        return [] if self.image_size is None else ["camera_front"]

    @property
    def action_dim(self) -> int:
        return 2

    @property
    def max_steps(self) -> int:
        return self._max_steps

    def dataset_attrs(self) -> dict:
        attrs = {
            "source": "sim:blockpush",
            "control_hz": self.control_hz,
            "obs_keys": self.obs_keys,
            "state_layout": [[name, size] for name, size in self.state_layout],
            "action_meaning": ("absolute effector target (x, y) in metres = joint targets (pusher_x, pusher_y)"
                               if self.action_is_joint_target else "effector target displacement (dx, dy) in metres per step"),
            "action_mode": self.action_mode,
            "max_action_step": MAX_STEP,
            "goal_tolerance": self.goal_tolerance,
            "target_layout": self.target_layout,
            "modes": MODES,
        }
        if self.image_size is not None:
            attrs["cameras"] = {"front": {"height": self.image_size, "width": self.image_size}}
        if self.action_is_joint_target:
            attrs["joint_names"] = list(JOINT_NAMES)
            attrs["robot"] = "blockpush_sim"
        return attrs

    @property
    def state_layout(self) -> list[tuple[str, int]]:
        layout = [entry for entry in STATE_LAYOUT if self.effector_target_in_state or entry[0] != "effector_target_xy"]
        return layout + (RELATIVE_LAYOUT if self.relative_features else [])

    def make_expert(self) -> "BlockPushExpert":
        return BlockPushExpert(absolute=self.action_is_joint_target)

    # ------------------------------------------------------------------ scene
    def _build_scene(self) -> None:
        """Rebuild everything from scratch at each reset: the only way pybullet is bit-deterministic."""
        pb, c = self._pb_module, self.client
        c.resetSimulation()
        c.setGravity(0, 0, -9.81)
        c.setTimeStep(1.0 / SIM_HZ)
        c.setPhysicsEngineParameter(numSolverIterations=50, deterministicOverlappingPairs=1)
        table_col = c.createCollisionShape(pb.GEOM_BOX, halfExtents=[0.6, 0.7, 0.01])
        table_vis = c.createVisualShape(pb.GEOM_BOX, halfExtents=[0.6, 0.7, 0.01], rgbaColor=[0.82, 0.78, 0.7, 1])
        table = c.createMultiBody(0, table_col, table_vis, basePosition=[0.4, 0.0, -0.01])
        c.changeDynamics(table, -1, lateralFriction=0.5)
        self._ids["table"] = table
        h = BLOCK_SIZE / 2
        self._ids["blocks"] = []
        for color in BLOCK_COLORS:
            col = c.createCollisionShape(pb.GEOM_BOX, halfExtents=[h, h, h])
            vis = c.createVisualShape(pb.GEOM_BOX, halfExtents=[h, h, h], rgbaColor=color)
            body = c.createMultiBody(0.1, col, vis, basePosition=[0, 0, h])
            c.changeDynamics(body, -1, lateralFriction=0.5, spinningFriction=0.001, rollingFriction=0.0)
            self._ids["blocks"].append(body)
        self._ids["targets"] = []
        t = TARGET_SIZE / 2
        for color in TARGET_COLORS:
            vis = c.createVisualShape(pb.GEOM_BOX, halfExtents=[t, t, 0.001], rgbaColor=color)
            self._ids["targets"].append(c.createMultiBody(0, -1, vis, basePosition=[0, 0, 0.001]))
        col = c.createCollisionShape(pb.GEOM_CYLINDER, radius=PUSHER_RADIUS, height=0.06)
        vis = c.createVisualShape(pb.GEOM_CYLINDER, radius=PUSHER_RADIUS, length=0.06, rgbaColor=[0.2, 0.3, 0.9, 1])
        pz = 0.031
        pusher = c.createMultiBody(1.0, col, vis, basePosition=[*EFFECTOR_START, pz])
        c.changeDynamics(pusher, -1, lateralFriction=0.3, linearDamping=0.0, angularDamping=0.0)
        c.setCollisionFilterPair(pusher, table, -1, -1, 0)
        self._ids["pusher"] = pusher
        self._pusher_z = pz
        self._constraint = c.createConstraint(pusher, -1, -1, -1, pb.JOINT_FIXED, [0, 0, 0], [0, 0, 0],
                                              [*EFFECTOR_START, pz])
        c.changeConstraint(self._constraint, [*EFFECTOR_START, pz], maxForce=60.0)

    def _sample_layout(self, rng: np.random.Generator):
        def pair(center_y, min_dx):
            for _ in range(1000):
                xy = np.stack([[0.4 + rng.uniform(-0.1, 0.1), center_y + rng.uniform(-0.15, 0.15)] for _ in range(2)])
                if abs(xy[0, 0] - xy[1, 0]) > min_dx:
                    return xy
            raise RuntimeError("could not place objects")  # cannot happen with these ranges

        blocks = pair(-0.2, 0.1)
        block_yaw = rng.uniform(0, math.pi, size=2)
        if self.target_layout == "random":
            targets = pair(0.2, 0.12)
            target_yaw = math.pi + rng.uniform(-math.pi / 6, math.pi / 6, size=2)
        else:  # two fixed slots 0.24 apart, a few mm of jitter, the slot order drawn
            side = 0.12 * rng.choice([-1.0, 1.0])
            targets = np.array([[0.4 + s + rng.uniform(-0.005, 0.005), 0.2 + rng.uniform(-0.0075, 0.0075)]
                                for s in (side, -side)])
            target_yaw = math.pi + rng.uniform(-math.pi / 30, math.pi / 30, size=2)
        return blocks, block_yaw, targets, target_yaw

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int | None = None) -> dict:
        self._rng = np.random.default_rng(seed)
        self._build_scene()
        c = self.client
        blocks, block_yaw, targets, target_yaw = self._sample_layout(self._rng)
        for body, xy, yaw in zip(self._ids["blocks"], blocks, block_yaw):
            c.resetBasePositionAndOrientation(body, [xy[0], xy[1], BLOCK_SIZE / 2], c.getQuaternionFromEuler([0, 0, yaw]))
        for body, xy, yaw in zip(self._ids["targets"], targets, target_yaw):
            c.resetBasePositionAndOrientation(body, [xy[0], xy[1], 0.001], c.getQuaternionFromEuler([0, 0, yaw]))
        self.targets_xy = targets.copy()
        self.targets_yaw = np.array([_wrap_cube_yaw(y) for y in target_yaw])
        self.effector_target = EFFECTOR_START.copy()
        for _ in range(24):  # let the blocks settle on the table
            c.stepSimulation()
        self._t = 0
        self._touched = [False, False]
        self._first_touched: int | None = None
        self._entered_at: list[int | None] = [None, None]  # step at which each block entered its current target
        self._in_target: list[int | None] = [None, None]
        self._update_events()
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict, bool]:
        if self.action_is_joint_target:
            return self.step_joints(action)
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (2,) or not np.all(np.isfinite(a)):
            raise VqbetError(f"blockpush action {np.asarray(action).tolist()!r}: expected 2 finite numbers (dx, dy)")
        return self._move(a)

    def step_joints(self, targets: np.ndarray) -> tuple[dict, bool]:
        """Move the pusher towards the absolute target (pusher_x, pusher_y), at most ``MAX_STEP`` this step."""
        t = np.asarray(targets, dtype=np.float64).reshape(-1)
        if t.shape != (2,) or not np.all(np.isfinite(t)):
            raise VqbetError(f"blockpush joint targets {np.asarray(targets).tolist()!r}: expected 2 finite numbers "
                             f"({', '.join(JOINT_NAMES)})")
        return self._move(np.clip(t, WORKSPACE[0], WORKSPACE[1]) - self.effector_target)

    def joint_positions(self) -> np.ndarray:
        return self.effector_xy()

    def _move(self, a: np.ndarray) -> tuple[dict, bool]:
        norm = float(np.linalg.norm(a))
        if norm > MAX_STEP:
            a = a * (MAX_STEP / norm)
        start = self.effector_target.copy()
        goal = np.clip(start + a, WORKSPACE[0], WORKSPACE[1])
        c = self.client
        for k in range(1, self.substeps + 1):  # move the constraint smoothly along the step
            p = start + (goal - start) * (k / self.substeps)
            c.changeConstraint(self._constraint, [p[0], p[1], self._pusher_z], maxForce=60.0)
            c.stepSimulation()
        self.effector_target = goal
        self._t += 1
        self._update_events()
        done = self.result().success or self._t >= self._max_steps
        return self._obs(), done

    def _update_events(self) -> None:
        c = self.client
        pusher = self._ids["pusher"]
        bxy = self.blocks_xy()
        for i, body in enumerate(self._ids["blocks"]):
            if not self._touched[i] and c.getClosestPoints(pusher, body, 0.003):
                self._touched[i] = True
                if self._first_touched is None:
                    self._first_touched = i
            d = np.linalg.norm(self.targets_xy - bxy[i], axis=1)
            j = int(np.argmin(d))
            now = j if d[j] < self.goal_tolerance else None
            if now != self._in_target[i]:
                self._in_target[i] = now
                self._entered_at[i] = None if now is None else self._t

    # ------------------------------------------------------------------ state
    def blocks_xy(self) -> np.ndarray:
        return np.array([self.client.getBasePositionAndOrientation(b)[0][:2] for b in self._ids["blocks"]])

    def blocks_yaw(self) -> np.ndarray:
        c = self.client
        return np.array([c.getEulerFromQuaternion(c.getBasePositionAndOrientation(b)[1])[2] for b in self._ids["blocks"]])

    def effector_xy(self) -> np.ndarray:
        return np.array(self.client.getBasePositionAndOrientation(self._ids["pusher"])[0][:2])

    def _state(self) -> np.ndarray:
        bxy, byaw, eff = self.blocks_xy(), self.blocks_yaw(), self.effector_xy()
        parts = [bxy[0], [_wrap_cube_yaw(byaw[0])], bxy[1], [_wrap_cube_yaw(byaw[1])], eff]
        if self.effector_target_in_state:
            parts.append(self.effector_target)
        parts += [self.targets_xy[0], [self.targets_yaw[0]], self.targets_xy[1], [self.targets_yaw[1]]]
        if self.relative_features:  # in RELATIVE_LAYOUT's order
            parts += [bxy[i] - self.targets_xy[j] for i in range(2) for j in range(2)] + [eff - bxy[0], eff - bxy[1]]
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts]).astype(np.float32)

    def _obs(self) -> dict:
        obs = {"state": self._state()}
        if self.action_is_joint_target:
            obs["robot_joint"] = self.effector_xy().astype(np.float32)
        if self.image_size is not None:
            obs["camera_front"] = self._camera(self.image_size, self.image_size)
        return obs

    def _camera(self, width: int, height: int) -> np.ndarray:
        pb, c = self._pb_module, self.client
        view = c.computeViewMatrix(cameraEyePosition=[0.4, -0.45, 0.85], cameraTargetPosition=[0.4, -0.02, 0.0],
                                   cameraUpVector=[0, 0, 1])
        proj = c.computeProjectionMatrixFOV(fov=56, aspect=width / height, nearVal=0.05, farVal=3.0)
        _, _, rgba, _, _ = c.getCameraImage(width, height, view, proj, shadow=0, renderer=pb.ER_TINY_RENDERER,
                                            flags=pb.ER_NO_SEGMENTATION_MASK)
        return np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[:, :, :3].copy()

    def render(self) -> np.ndarray:
        return self._camera(self.render_size, self.render_size)

    # ------------------------------------------------------------------ outcome
    def result(self) -> EpisodeResult:
        placed = [(self._entered_at[i], i, self._in_target[i]) for i in range(2) if self._in_target[i] is not None]
        placed.sort()
        mode = ",".join(f"b{i}->t{j}" for _, i, j in placed) or None
        distinct = len(placed) == 2 and placed[0][2] != placed[1][2]
        info = {
            "reached": int(sum(self._touched)),
            "in_target": int(len({j for _, _, j in placed})),
            "first_touched": self._first_touched,
            "block_targets": [None if t is None else int(t) for t in self._in_target],
        }
        return EpisodeResult(success=bool(distinct), mode=mode, length=self._t, info=info)

    @staticmethod
    def summarize(results: list[EpisodeResult], demo_modes: list[str] | None = None) -> dict:
        if not results:
            raise VqbetError("blockpush summarize: no episode results (expected at least one)")
        n = len(results)
        reached = [int(r.info.get("reached", 0)) for r in results]
        placed = [int(r.info.get("in_target", 0)) for r in results]
        keys = sorted(set(MODES) | {m for m in (demo_modes or []) if m})
        return {
            "R1": sum(r >= 1 for r in reached) / n,
            "R2": sum(r >= 2 for r in reached) / n,
            "P1": sum(p >= 1 for p in placed) / n,
            "P2": sum(p >= 2 for p in placed) / n,
            "success": sum(r.success for r in results) / n,
            "mode_freq": mode_frequencies([r.mode for r in results], keys),
            "demo_mode_freq": mode_frequencies(list(demo_modes), keys) if demo_modes else {},
            "first_reached_freq": mode_frequencies(  # BeT Table 2: which block was reached first
                [None if r.info.get("first_touched") is None else f"b{r.info['first_touched']}" for r in results],
                ["b0", "b1"]),
            "episodes": n,
        }

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:  # already disconnected
            pass


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else np.zeros_like(v)


def _support(yaw: float, d: np.ndarray) -> float:
    """Distance from a cube's centre to its boundary along direction ``d`` (in the table plane)."""
    c, s = math.cos(yaw), math.sin(yaw)
    return BLOCK_SIZE / 2 * (abs(d[0] * c + d[1] * s) + abs(-d[0] * s + d[1] * c))


class BlockPushExpert(Expert):
    """Scripted push-from-behind controller; the mode (block order x target assignment) comes from the rng.

    For the current block it picks a push goal (the target, or a via point around the other block
    when that block lies on the straight path), walks the pusher around both blocks to a point
    behind the block on the goal line, and pushes along the line with lateral correction; if the
    block slips off the pusher it walks back behind it. Per-episode speed / stand-off jitter and a
    little action noise make demonstrations differ within a mode.
    """

    PLACE_TOL = 0.02  # push until the block centre is this close to the target (env counts 0.05)

    def __init__(self, absolute: bool = False):
        self.absolute = bool(absolute)  # act() returns the absolute effector target instead of the displacement

    def act(self, obs: dict) -> np.ndarray:
        delta = self._act(obs)
        if not self.absolute:
            return delta
        at = self.slices.get("effector_target_xy")
        # the last commanded target: from the state when it carries it, else the expert's own previous command
        last = np.asarray(obs["state"], np.float64)[at] if at is not None else self.commanded
        self.commanded = np.clip(last + delta, WORKSPACE[0], WORKSPACE[1])
        return self.commanded.astype(np.float32)

    def reset(self, env: SimEnv, rng: np.random.Generator) -> None:
        self.rng = rng
        offsets, start = {}, 0
        for name, size in env.state_layout:  # where each quantity sits in this env's state vector
            offsets[name] = slice(start, start + size)
            start += size
        self.slices = offsets
        self.commanded = EFFECTOR_START.copy()
        self.mode_index = int(rng.integers(4))
        first_block = self.mode_index // 2
        first_target = self.mode_index % 2
        self.jobs = [(first_block, first_target), (1 - first_block, 1 - first_target)]
        self.mode = f"b{first_block}->t{first_target},b{1 - first_block}->t{1 - first_target}"
        self.speed = float(rng.uniform(0.8, 1.0)) * MAX_STEP
        self.push_speed = float(rng.uniform(0.55, 0.75)) * MAX_STEP
        self.standoff = float(rng.uniform(0.015, 0.03))
        self.noise = 0.0015
        self.job = 0
        self.phase = "approach"
        self.retreat_steps = 0
        self.sides: dict[int, float] = {}

    def _parse(self, s: np.ndarray):
        at = self.slices
        blocks = np.array([s[at["block0_xy"]], s[at["block1_xy"]]], dtype=np.float64)
        yaws = np.array([s[at["block0_yaw"]][0], s[at["block1_yaw"]][0]], dtype=np.float64)
        eff = np.array(s[at["effector_xy"]], dtype=np.float64)
        targets = np.array([s[at["target0_xy"]], s[at["target1_xy"]]], dtype=np.float64)
        return blocks, yaws, eff, targets

    def _navigate(self, eff: np.ndarray, goal: np.ndarray, obstacles: list[np.ndarray], radius: float) -> np.ndarray:
        """Direction that heads for ``goal`` but walks around discs of ``radius`` around the obstacles.

        The side on which an obstacle is passed is chosen once and kept (``self.sides``), so the
        pusher does not dither in front of a block it has to go around.
        """
        to_goal = goal - eff
        dist = float(np.linalg.norm(to_goal))
        if dist < 1e-9:
            return np.zeros(2)
        direction = to_goal / dist
        best = None
        for k, o in enumerate(obstacles):
            rel = o - eff
            r = float(np.linalg.norm(rel))
            if float(np.linalg.norm(goal - o)) < radius:
                continue
            along = float(rel @ direction)
            lateral = float(rel[0] * direction[1] - rel[1] * direction[0])  # > 0: obstacle right of path
            blocking = r < radius or (0 < along < dist + radius and abs(lateral) < radius)
            if blocking and (best is None or r < best[0]):
                best = (r, rel, k, lateral)
        if best is None:
            return direction
        r, rel, k, lateral = best
        if k not in self.sides:
            self.sides[k] = -1.0 if lateral > 0 else 1.0  # pass on the side the path already leans to
        side = self.sides[k]
        if r < radius:  # inside the clearance disc: slide around it while backing out
            out = _unit(-rel)
            tangent = np.array([-out[1], out[0]]) * side
            return _unit(out * (radius - r) / radius * 2 + tangent)
        half = math.asin(min(1.0, radius / r)) * 1.05
        ang = math.atan2(rel[1], rel[0]) + side * half
        return np.array([math.cos(ang), math.sin(ang)])

    def _push_goal(self, block: np.ndarray, target: np.ndarray, other: np.ndarray) -> np.ndarray:
        """The target, or a via point beside ``other`` when it sits on the straight push path."""
        seg = target - block
        length = float(np.linalg.norm(seg))
        if length < 1e-6:
            return target
        d = seg / length
        rel = other - block
        along = float(rel @ d)
        if 0 < along < length:
            closest = block + along * d
            gap = float(np.linalg.norm(closest - other))
            if gap < 0.075:
                n = _unit(closest - other) if gap > 1e-6 else np.array([-d[1], d[0]])
                return other + n * 0.095
        return target

    def _act(self, obs: dict) -> np.ndarray:
        blocks, yaws, eff, targets = self._parse(np.asarray(obs["state"]))
        tol = self.PLACE_TOL
        while self.job < 2:
            b, t = self.jobs[self.job]
            if np.linalg.norm(blocks[b] - targets[t]) < tol:
                self.job += 1
                self.phase = "approach"
                self.sides = {}
                self.retreat_steps = 3
                self.retreat_from = blocks[b].copy()
                continue
            break
        if self.job >= 2:
            return np.zeros(2, dtype=np.float32)
        if self.retreat_steps > 0:  # back off the block we just placed before walking to the next one
            self.retreat_steps -= 1
            return (_unit(eff - self.retreat_from) * self.speed * 0.6).astype(np.float32)
        b, t = self.jobs[self.job]
        block, other = blocks[b], blocks[1 - b]
        goal = self._push_goal(block, targets[t], other)
        d = _unit(goal - block)
        reach = _support(yaws[b], -d) + PUSHER_RADIUS
        rel = eff - block
        behind = -float(rel @ d)
        lateral = float(rel[0] * -d[1] + rel[1] * d[0])  # signed offset of the pusher from the push line
        if self.phase == "push" and (abs(lateral) > 0.02 or behind > reach + 0.035 or behind < reach * 0.5):
            self.phase = "approach"
            self.sides = {}
        if self.phase == "approach":
            pre = block - d * (reach + self.standoff)
            if np.linalg.norm(pre - eff) < 0.006:
                self.phase = "push"
            else:
                clear = BLOCK_SIZE / 2 * math.sqrt(2) + PUSHER_RADIUS + 0.008
                obstacles = [blocks[0], blocks[1]]
                direction = self._navigate(eff, pre, obstacles, clear)
                step = min(self.speed, float(np.linalg.norm(pre - eff)))
                return self._noisy(direction * step)
        dist = float(np.linalg.norm(targets[t] - block)) if np.array_equal(goal, targets[t]) else 0.1
        v = float(np.clip(0.8 * dist, 0.006, self.push_speed))
        perp = np.array([-d[1], d[0]])
        action = d * v - perp * float(np.clip(lateral, -0.01, 0.01)) * 0.8
        return self._noisy(action)

    def _noisy(self, a: np.ndarray) -> np.ndarray:
        a = a + self.rng.normal(0.0, self.noise, size=2)
        n = float(np.linalg.norm(a))
        if n > MAX_STEP:
            a = a * (MAX_STEP / n)
        return a.astype(np.float32)
