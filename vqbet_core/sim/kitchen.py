"""Franka Kitchen (gymnasium-robotics ``FrankaKitchen-v1``) with a scripted multi-task expert.

The long-horizon benchmark of the VQ-BeT / BeT papers: a 9-DoF Franka in a kitchen with a microwave,
a slide cabinet, a hinge cabinet, a light switch and oven knobs. An episode asks for ``goal_count``
of ``tasks`` (default: 4 of the 5 tasks the expert can do); the *order* in which they get done is
the behaviour mode, so demonstrations in randomized orders are the multimodal part.

Observations (dataset keys):

- ``robot_joint`` float32 (9,): the 7 arm joint angles and the 2 finger positions, with the
  official env's sensor noise. This is what a real arm reports, so it is the policy input that
  carries over to ROS data.
- ``state`` float32 (59,): the official env's full low-dim observation: robot qpos (9) and qvel (9),
  object qpos (21) and qvel (20), same noise. The state-based benchmark input. With
  ``state_velocities=False`` it is (30,): robot qpos and object qpos only, the input the BeT and
  VQ-BeT papers trained on (the first 30 dims of D4RL's relay-kitchen observation). Why offer it:
  the robot's velocities carry the last commanded motion, which a history-conditioned policy can
  copy instead of reading the scene.
- ``camera_<name>`` uint8 (H, W, 3) for each of ``cameras`` when ``image_size`` is set.

Action (``action_mode``):

- ``"joint_pos"`` (default) float32 (9,): absolute joint position targets (7 arm joints in rad, 2
  fingers in m, 0 = closed, 0.04 = open). Why not the official velocities: the dataset contract
  says ``action`` is the commanded joint target and the ROS policy node sends it as a
  JointTrajectory, so kitchen demos and policies use the same action as a real arm. The target is
  applied *through* the official env step (its velocity limit, 2 rad/s, and position bounds stay in
  force) with gravity feed-forward added, as a real arm's position controller does; without it the
  arm sags up to 0.026 rad under the env's stiff-but-uncompensated position servos.
- ``"joint_vel"``: the official 9-dim normalized joint velocities in [-1, 1], passed through as is.

Task completion uses the official thresholds (``OBS_ELEMENT_GOALS``, norm < ``BONUS_THRESH``) on the
true joint state; a task counts once, when it first gets within the threshold. The mode label is the
completion order, e.g. ``"microwave>light switch>slide cabinet>bottom burner"``.

Rendering is headless (``MUJOCO_GL=egl`` unless already set, which must happen before mujoco is
first imported) with shadows and multisampling off: ~20x cheaper than the model's defaults.

The scripted expert (``KitchenExpert``) does the tasks in a random order per episode. Measured with
seeds 1000.., ``rng = default_rng([seed, 1])`` as ``vqbet sim-demos`` draws it: default env (4 of 5):
50 of 50 episodes complete 4 tasks, 277 steps on average (max 342), 40 distinct orders (5.2 bits);
``goal_count=5``: 30 of 30 complete all 5, 346 steps on average (max 397).
"""

from __future__ import annotations

import contextlib
import io
import math
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from vqbet_core.errors import VqbetError  # noqa: E402
from vqbet_core.sim.base import EpisodeResult, Expert, SimEnv  # noqa: E402



def _load_triton_before_gl() -> None:
    """Import triton (when installed) before the first OpenGL context. Why: Mesa's EGL loads the system
    libLLVM, and triton's own LLVM then segfaults at import - which torch does lazily, e.g. when
    vector-quantize-pytorch is first imported after a rendered episode (seen with Mesa 22.3 / libLLVM-15
    and triton 3.7). Loaded first, both live side by side. Nothing to do on machines without triton."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pass

# gymnasium_robotics prints an unrelated Adroit-reward notice to stderr when imported
with contextlib.redirect_stderr(io.StringIO()):
    from gymnasium_robotics.envs.franka_kitchen.kitchen_env import (  # noqa: E402
        BONUS_THRESH,
        OBS_ELEMENT_GOALS,
        OBS_ELEMENT_INDICES,
    )
    from gymnasium_robotics.envs.franka_kitchen.kitchen_env import KitchenEnv as _GymKitchenEnv  # noqa: E402

ALL_TASKS = tuple(OBS_ELEMENT_GOALS)  # the official 7
EXPERT_TASKS = ("microwave", "slide cabinet", "hinge cabinet", "light switch", "bottom burner")
DEFAULT_TASKS = EXPERT_TASKS
ACTION_MODES = ("joint_pos", "joint_vel")
# free camera looking at the whole kitchen (the official env's default viewer camera)
FRONT_CAMERA = {"distance": 2.2, "azimuth": 70.0, "elevation": -35.0, "lookat": (-0.2, 0.5, 2.0)}
GRIPPER_OPEN = 0.04
GRIPPER_CLOSED = 0.0


class KitchenEnv(SimEnv):
    """FrankaKitchen-v1 behind the ``SimEnv`` interface (see the module docstring for keys/actions)."""

    name = "kitchen"

    def __init__(
        self,
        tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS,
        goal_count: int | None = None,
        image_size: int | None = None,
        cameras: tuple[str, ...] | list[str] = ("front",),
        max_steps: int | None = None,
        action_mode: str = "joint_pos",
        robot_noise_ratio: float = 0.01,
        object_noise_ratio: float = 0.0005,
        state_velocities: bool = True,
    ):
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        bad = [t for t in tasks if t not in ALL_TASKS]
        if bad or not tasks or len(set(tasks)) != len(tasks):
            raise VqbetError(f"kitchen tasks {list(tasks)}: expected distinct names from {list(ALL_TASKS)}")
        goal_count = min(4, len(tasks)) if goal_count is None else goal_count
        if not _is_int(goal_count) or not 1 <= goal_count <= len(tasks):
            raise VqbetError(f"kitchen goal_count={goal_count!r}: expected an int in 1..{len(tasks)} (number of tasks)")
        if action_mode not in ACTION_MODES:
            raise VqbetError(f"kitchen action_mode={action_mode!r}: expected one of {', '.join(ACTION_MODES)}")
        if image_size is not None and (not _is_int(image_size) or not 16 <= image_size <= 1024):
            raise VqbetError(f"kitchen image_size={image_size!r}: expected None or an int in 16..1024")
        if max_steps is not None and (not _is_int(max_steps) or max_steps < 1):
            raise VqbetError(f"kitchen max_steps={max_steps!r}: expected None or a positive int")
        for name, ratio in (("robot_noise_ratio", robot_noise_ratio), ("object_noise_ratio", object_noise_ratio)):
            if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
                raise VqbetError(f"kitchen {name}={ratio!r}: expected a number in [0, 1]")
        if not isinstance(state_velocities, (bool, np.bool_)):
            raise VqbetError(f"kitchen state_velocities={state_velocities!r}: expected true or false")
        self.state_velocities = bool(state_velocities)
        self.tasks = tasks
        self.goal_count = int(goal_count)
        self.image_size = None if image_size is None else int(image_size)
        self.action_mode = action_mode
        self.action_is_joint_target = action_mode == "joint_pos"
        self._max_steps = int(max_steps) if max_steps is not None else 140 * self.goal_count

        self._gym = _GymKitchenEnv(
            tasks_to_complete=list(tasks),
            terminate_on_tasks_completed=False,
            object_noise_ratio=object_noise_ratio,
            robot_noise_ratio=robot_noise_ratio,
        )
        self.model = self._gym.model
        self.data = self._gym.data
        self._robot = self._gym.robot_env
        self.model.vis.quality.shadowsize = 0
        self.model.vis.quality.offsamples = 0
        self.dt = float(self._robot.dt)  # 0.08 s: 40 physics steps of 2 ms
        self.control_hz = 1.0 / self.dt
        self.joint_names = [
            mujoco.mj_id2name(self.model, mujoco.mjtObj.mjOBJ_JOINT, j).removeprefix("robot:") for j in range(9)
        ]
        self._kp = self.model.actuator_gainprm[:9, 0].copy()
        # what the env lets a position target be: the joint range and the official env's position bounds
        self.q_low = np.maximum(self.model.jnt_range[:9, 0], self._robot.robot_pos_bound[:9, 0])
        self.q_high = np.minimum(self.model.jnt_range[:9, 1], self._robot.robot_pos_bound[:9, 1])

        cameras = (cameras,) if isinstance(cameras, str) else tuple(cameras)
        named = [mujoco.mj_id2name(self.model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(self.model.ncam)]
        for cam in cameras:
            if cam != "front" and cam not in named:
                raise VqbetError(f"kitchen camera '{cam}': expected 'front' or one of the model's cameras {named}")
        if not cameras:
            raise VqbetError("kitchen cameras: expected at least one camera name (e.g. 'front')")
        self.cameras = cameras
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}

        self._t = 0
        self._completed: list[str] = []
        self._last_obs: dict | None = None
        # encoder pretraining labels: every limited joint (robot and the kitchen's doors, knobs, switch, slides)
        self._label_joints = [j for j in range(self.model.njnt) if self.model.jnt_limited[j]
                              and self.model.jnt_type[j] in (mujoco.mjtJoint.mjJNT_HINGE, mujoco.mjtJoint.mjJNT_SLIDE)]
        self.pretrain_label_names = [mujoco.mj_id2name(self.model, mujoco.mjtObj.mjOBJ_JOINT, j).removeprefix("robot:")
                                     for j in self._label_joints]

    # ------------------------------------------------------------------ interface
    @property
    def obs_keys(self) -> list[str]:
        return ["robot_joint", "state"]

    @property
    def image_keys(self) -> list[str]:
        return [f"camera_{c}" for c in self.cameras] if self.image_size else []

    @property
    def action_dim(self) -> int:
        return 9

    @property
    def max_steps(self) -> int:
        return self._max_steps

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def completed(self) -> list[str]:
        """Tasks completed so far this episode, in completion order."""
        return list(self._completed)

    def reset(self, seed: int | None = None) -> dict:
        gym_obs, _ = self._gym.reset(seed=None if seed is None else int(seed))
        self._t = 0
        self._completed = []
        self._last_obs = self._make_obs(gym_obs)
        return self._last_obs

    def step(self, action: np.ndarray) -> tuple[dict, bool]:
        if self._last_obs is None:
            raise VqbetError("kitchen step() called before reset()")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (9,) or not np.all(np.isfinite(a)):
            raise VqbetError(f"kitchen action of shape {np.shape(action)}: expected 9 finite numbers "
                             f"({self.action_mode})")
        vel = self.position_to_velocity(a) if self.action_mode == "joint_pos" else a
        gym_obs, *_ = self._gym.step(vel)
        self._t += 1
        self._track_completions()
        self._last_obs = self._make_obs(gym_obs)
        done = len(self._completed) >= self.goal_count or self._t >= self._max_steps
        return self._last_obs, done

    def result(self) -> EpisodeResult:
        n = len(self._completed)
        return EpisodeResult(
            success=n >= self.goal_count,
            mode=">".join(self._completed) if n else None,
            length=self._t,
            info={"completed": list(self._completed), "num_completed": n, "tasks": list(self.tasks),
                  "goal_count": self.goal_count},
        )

    def make_expert(self) -> "KitchenExpert":
        return KitchenExpert(self)

    def dataset_attrs(self) -> dict:
        return {
            "source": f"sim:{self.name}",
            "simulator": "gymnasium_robotics FrankaKitchen-v1 (mujoco)",
            "joint_names": list(self.joint_names),
            "control_hz": self.control_hz,
            "tasks": list(self.tasks),
            "task_names": list(self.tasks),  # data/task_index indexes this list (DESIGN.md section 9)
            "goal_count": self.goal_count,
            "obs_keys": self.obs_keys,
            "image_keys": self.image_keys,
            "camera_names": list(self.cameras) if self.image_size else [],
            "image_size": self.image_size,
            "action_mode": self.action_mode,
            "action_dim": self.action_dim,
            "state_velocities": self.state_velocities,
            **({"task_state_dims": {"state": self.task_state_dims()}} if "state" in self.obs_keys else {}),
        }

    def task_state_dims(self) -> dict[str, list[int]]:
        """Per subtask, the indices into ``obs["state"]`` its completion is judged on (the official
        ``OBS_ELEMENT_INDICES``, moved past the robot velocities when the state carries them). Kept with the
        demos so training can show the completion head a subtask's object left where it started
        (``completion.unmoved``) without knowing the kitchen."""
        shift = 0 if not self.state_velocities else 9  # 59-d state: robot qpos 9, robot qvel 9, object qpos ...
        return {task: [int(i) + (shift if int(i) >= 9 else 0) for i in OBS_ELEMENT_INDICES[task]] for task in self.tasks}

    # ------------------------------------------------------------------ joint-space robot protocol (SimRobot)
    def joint_positions(self) -> np.ndarray:
        """Measured joint positions (``joint_names`` order, with the env's sensor noise), as ``robot_joint``."""
        if self._last_obs is None:
            raise VqbetError("kitchen joint_positions() called before reset()")
        return self._last_obs["robot_joint"].astype(np.float64)

    def step_joints(self, targets: np.ndarray) -> tuple[dict, bool]:
        """One control step toward joint position ``targets``, whatever the action mode."""
        if self.action_is_joint_target:
            return self.step(targets)
        targets = np.asarray(targets, dtype=np.float64).reshape(-1)
        if targets.shape != (9,) or not np.all(np.isfinite(targets)):
            raise VqbetError(f"kitchen joint targets of shape {targets.shape}: expected 9 finite numbers")
        return self.step(self.position_to_velocity(targets))

    # ------------------------------------------------------------------ encoder pretraining (see SimEnv)
    def pretrain_labels(self) -> np.ndarray:
        """Every limited joint's position, mapped from its range to [-1, 1] (``pretrain_label_names`` order)."""
        lo, hi = self.model.jnt_range[self._label_joints].T
        q = self.data.qpos[self.model.jnt_qposadr[self._label_joints]]
        return (2.0 * (q - lo) / (hi - lo) - 1.0).astype(np.float32)

    def pretrain_scene(self, rng: np.random.Generator) -> dict:
        """Doors, knobs, switch and slides anywhere in their ranges, the arm near its rest pose; one control step
        lets the physics settle what the random pose made inconsistent (knob-burner couplings, contacts)."""
        q = self.data.qpos.copy()
        objects = [j for j in self._label_joints if j >= 9]
        lo, hi = self.model.jnt_range[objects].T
        q[self.model.jnt_qposadr[objects]] = rng.uniform(lo, hi)
        q[:7] = np.clip(np.array(_REST) + rng.normal(0.0, 0.3, 7), self.q_low[:7], self.q_high[:7])
        self.data.qpos[:] = q
        self.data.qvel[:] = 0.0
        mujoco.mj_forward(self.model, self.data)
        self._robot._last_robot_qpos = q[:9].copy()  # what position_to_velocity integrates from
        return self.step_joints(q[:9])[0]

    def random_action(self, rng: np.random.Generator) -> np.ndarray:
        """Joint targets a short random reach from the current pose (or the velocity that commands them)."""
        target = np.clip(self.data.qpos[:9] + rng.normal(0.0, 0.25, 9), self.q_low, self.q_high)
        return target if self.action_is_joint_target else self.position_to_velocity(target)

    # ------------------------------------------------------------------ control
    def position_to_velocity(self, target: np.ndarray) -> np.ndarray:
        """The official normalized velocity action that makes the env command ``target`` (+ gravity feed-forward)."""
        target = np.clip(np.asarray(target, dtype=np.float64), self.q_low, self.q_high)
        ctrl = target + self.data.qfrc_bias[:9] / self._kp
        vel = (ctrl - self._robot._last_robot_qpos) / (self.dt * self._robot.act_rng)
        return np.clip(vel, -1.0, 1.0)

    def _track_completions(self) -> None:
        qpos = self.data.qpos
        for task in self.tasks:  # fixed order, so two completions in one step are ordered deterministically
            if task not in self._completed:
                if np.linalg.norm(qpos[OBS_ELEMENT_INDICES[task]] - OBS_ELEMENT_GOALS[task]) < BONUS_THRESH:
                    self._completed.append(task)

    def _make_obs(self, gym_obs: dict) -> dict:
        state = np.asarray(gym_obs["observation"], dtype=np.float32).copy()
        obs = {"robot_joint": state[:9].copy(), "state": state if self.state_velocities else positions_of(state)}
        if self.image_size:
            for cam in self.cameras:
                obs[f"camera_{cam}"] = self.render(cam, self.image_size)
        return obs

    # ------------------------------------------------------------------ rendering
    def render(self, camera: str | None = None, size: int | None = None) -> np.ndarray:
        """RGB frame (size, size, 3) uint8 from ``camera`` (default: the first configured one)."""
        camera = camera or self.cameras[0]
        size = int(size or self.image_size or 256)
        key = (size, size)
        renderer = self._renderers.get(key)
        if renderer is None:
            _load_triton_before_gl()
            try:
                renderer = self._renderers[key] = mujoco.Renderer(self.model, size, size)
            except mujoco.FatalError as exc:
                raise VqbetError(f"kitchen rendering: no OpenGL context ({exc}); set MUJOCO_GL=egl (or osmesa) "
                                 "before mujoco is first imported") from None
        if camera == "front":
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FREE
            cam.distance = FRONT_CAMERA["distance"]
            cam.azimuth = FRONT_CAMERA["azimuth"]
            cam.elevation = FRONT_CAMERA["elevation"]
            cam.lookat[:] = FRONT_CAMERA["lookat"]
            renderer.update_scene(self.data, camera=cam)
        else:
            renderer.update_scene(self.data, camera=camera)
        return renderer.render().copy()

    def render_state(self, state: np.ndarray, camera: str | None = None, size: int | None = None) -> np.ndarray:
        """The frame ``camera`` sees with the kitchen posed as a recorded ``obs["state"]`` (30-d positions or the
        59-d state). Why: re-rendering demo steps with one object put back (``completion.unmoved`` for image
        policies) needs the scene of a step without replaying it. The env's own state is left as it was."""
        q = positions_of(np.asarray(state, dtype=np.float64).reshape(-1))
        if q.shape != (self.model.nq,) or not np.all(np.isfinite(q)):
            raise VqbetError(f"kitchen state of {np.asarray(state).size} values: expected 30 (positions) or 59 finite numbers")
        saved_q, saved_v = self.data.qpos.copy(), self.data.qvel.copy()
        try:
            self.data.qpos[:] = q
            self.data.qvel[:] = 0.0
            mujoco.mj_forward(self.model, self.data)
            return self.render(camera, size)
        finally:
            self.data.qpos[:], self.data.qvel[:] = saved_q, saved_v
            mujoco.mj_forward(self.model, self.data)

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()

    # ------------------------------------------------------------------ metrics
    @staticmethod
    def summarize(results: list[EpisodeResult], demo_modes: list[str] | None = None) -> dict:
        """Tasks completed per episode (mean, fraction with >= k), per-task rates, order entropy (bits)."""
        orders = [_completed_of(r) for r in results]
        counts = np.array([len(o) for o in orders], dtype=float)
        n = len(results)
        out: dict = {"episodes": n, "tasks_mean": float(counts.mean()) if n else 0.0}
        top = max(4, int(counts.max()) if n else 0)
        for k in range(1, top + 1):
            out[f"frac_ge_{k}"] = float((counts >= k).mean()) if n else 0.0
        out["success_rate"] = float(np.mean([r.success for r in results])) if n else 0.0
        tasks = {t for r in results for t in r.info.get("tasks", [])} | {t for o in orders for t in o}
        for task in sorted(tasks):  # how often each task got done
            out[f"rate_{task.replace(' ', '_')}"] = sum(task in o for o in orders) / n
        out["order_entropy"] = order_entropy([">".join(o) for o in orders])
        out["distinct_orders"] = len({">".join(o) for o in orders if o})
        firsts = [o[0] for o in orders if o]  # the first decision is where the order's diversity starts
        out["first_task_freq"] = {t: firsts.count(t) / len(firsts) for t in sorted(set(firsts))} if firsts else {}
        out["demo_order_entropy"] = None if demo_modes is None else order_entropy(list(demo_modes))
        # Entropy grows with the sample count (50 episodes cap it at log2(50) = 5.6 bits), so the fair
        # comparison is against the demos' entropy at the rollouts' own count.
        labelled = sum(1 for o in orders if o)
        out["demo_order_entropy_at_n"] = (
            None if demo_modes is None else subsample_entropy(list(demo_modes), labelled)
        )
        return out


def _completed_of(result: EpisodeResult) -> list[str]:
    if "completed" in result.info:
        return list(result.info["completed"])
    return result.mode.split(">") if result.mode and result.mode != "none" else []


def order_entropy(modes: list[str | None]) -> float:
    """Shannon entropy (bits) of the completion-order labels of episodes that completed >= 1 task."""
    labels = [m for m in modes if m and m != "none"]
    if not labels:
        return 0.0
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def subsample_entropy(modes: list[str | None], n: int, draws: int = 200, seed: int = 0) -> float:
    """Mean :func:`order_entropy` of ``draws`` random size-``n`` subsets of the labelled ``modes``."""
    labels = [m for m in modes if m and m != "none"]
    if n <= 0 or not labels:
        return 0.0
    if n >= len(labels):
        return order_entropy(labels)
    rng = np.random.default_rng(seed)
    arr = np.asarray(labels, dtype=object)
    return float(np.mean([order_entropy(list(rng.choice(arr, n, replace=False))) for _ in range(draws)]))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ====================================================================== scripted expert
def _rot(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix about a unit ``axis`` by ``angle`` (Rodrigues)."""
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


# gripper frame pointing forward (+y world), fingers closing along world x, site x-axis up
_R_FORWARD = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])


def gripper_rot(yaw: float = 0.0, pitch: float = 0.0) -> np.ndarray:
    """End-effector orientation: forward-pointing gripper turned by ``yaw`` about world z, ``pitch`` up (> 0) / down."""
    return _rot([0, 0, 1], yaw) @ _rot([1, 0, 0], pitch) @ _R_FORWARD


def _rot_error(r: np.ndarray, r_des: np.ndarray) -> np.ndarray:
    """Rotation error (world frame) taking ``r`` toward ``r_des``: axis * sin(angle) for angles below 90 deg."""
    return 0.5 * np.cross(r.T, r_des.T).sum(axis=0)


class _Kinematics:
    """Forward / inverse kinematics of the end-effector site on a private ``MjData`` (never the sim's)."""

    def __init__(self, env: KitchenEnv):
        self.m = env.model
        self.d = mujoco.MjData(self.m)
        self.ee = mujoco.mj_name2id(self.m, mujoco.mjtObj.mjOBJ_SITE, "end_effector")
        self.lo = env.q_low[:7] + 0.02
        self.hi = env.q_high[:7] - 0.02
        self.q_rest = np.array(_REST, dtype=float)
        self._jp = np.zeros((3, self.m.nv))
        self._jr = np.zeros((3, self.m.nv))
        root = self.m.body("panda0_link0").parentid[0]
        self._robot_bodies = {b for b in range(root, self.m.nbody) if self.m.body_rootid[b] == self.m.body_rootid[root]}

    def path_clear(self, qa: np.ndarray, qb: np.ndarray, samples: int = 12) -> bool:
        """Whether the straight joint-space path qa -> qb keeps the arm out of the kitchen (objects as now)."""
        qpos_save = self.d.qpos.copy()
        clear = True
        for s in np.linspace(0.0, 1.0, samples):
            self.d.qpos[:7] = qa + s * (qb - qa)
            mujoco.mj_kinematics(self.m, self.d)
            mujoco.mj_collision(self.m, self.d)
            for c in self.d.contact[: self.d.ncon]:
                robot1 = self.m.geom_bodyid[c.geom1] in self._robot_bodies
                robot2 = self.m.geom_bodyid[c.geom2] in self._robot_bodies
                if robot1 != robot2 and c.dist < 0:
                    clear = False
                    break
            if not clear:
                break
        self.d.qpos[:] = qpos_save
        mujoco.mj_kinematics(self.m, self.d)
        return clear

    def set_state(self, qpos: np.ndarray) -> None:
        self.d.qpos[:] = qpos
        mujoco.mj_kinematics(self.m, self.d)

    def site(self, name: str) -> np.ndarray:
        return self.d.site(name).xpos.copy()

    def joint(self, name: str) -> tuple[np.ndarray, np.ndarray, float]:
        """World anchor, world axis and angle of an object joint (at the last ``set_state``)."""
        j = self.d.joint(name)
        return j.xanchor.copy(), j.xaxis.copy(), float(j.qpos[0])

    def ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        return self.d.site_xpos[self.ee].copy(), self.d.site_xmat[self.ee].reshape(3, 3).copy()

    def fk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """End-effector pose for arm joints ``q`` (objects as at the last ``set_state``)."""
        qpos_save = self.d.qpos.copy()
        self.d.qpos[:7] = q
        mujoco.mj_kinematics(self.m, self.d)
        pose = self.ee_pose()
        self.d.qpos[:] = qpos_save
        mujoco.mj_kinematics(self.m, self.d)
        return pose

    def ik(self, q: np.ndarray, pos: np.ndarray, rot: np.ndarray, iters: int = 15, max_change: float = 0.12,
           weights: np.ndarray | None = None) -> np.ndarray:
        """Damped least squares on the arm joints, warm-started at ``q``, with a weak pull to the rest posture.

        ``weights`` (6,) scale the position / rotation-vector error rows: a small weight on the
        world-z rotation lets a hand holding a vertical bar turn about it where that helps the arm.
        The result moves no joint more than ``max_change`` from ``q``, so consecutive commands stay
        within the env's velocity limit (0.16 rad per step) and the path stays continuous.
        """
        q_start = q.copy()
        q = q.copy()
        qpos_save = self.d.qpos.copy()
        for _ in range(iters):
            self.d.qpos[:7] = q
            mujoco.mj_kinematics(self.m, self.d)
            mujoco.mj_comPos(self.m, self.d)
            p = self.d.site_xpos[self.ee]
            r = self.d.site_xmat[self.ee].reshape(3, 3)
            err = np.concatenate([pos - p, _rot_error(r, rot)])
            if np.abs(err[:3]).max() < 2e-4 and np.abs(err[3:] * (1 if weights is None else weights[3:])).max() < 2e-3:
                break
            mujoco.mj_jacSite(self.m, self.d, self._jp, self._jr, self.ee)
            jac = np.vstack([self._jp[:, :7], self._jr[:, :7]])
            if weights is not None:
                jac, err = jac * weights[:, None], err * weights
            jinv = jac.T @ np.linalg.inv(jac @ jac.T + 1e-4 * np.eye(6))
            # null space: drift to the task posture, and push off joint limits closer than 0.25 rad
            push = np.maximum(0.0, self.lo + 0.25 - q) - np.maximum(0.0, q - (self.hi - 0.25))
            dq = jinv @ err + (np.eye(7) - jinv @ jac) @ (0.05 * (self.q_rest - q) + 0.5 * push)
            q = np.clip(q + np.clip(dq, -0.3, 0.3), self.lo, self.hi)
            q = np.clip(q, q_start - max_change, q_start + max_change)
        self.d.qpos[:] = qpos_save
        mujoco.mj_kinematics(self.m, self.d)
        return q


# Per task: handle site, object joint and the value the expert drives it to (past the official
# threshold, short of the joint limit), grasp orientation (yaw, pitch), grasp point offset from the
# site, how much the hand turns with a hinge (``follow``: a vertical bar may also roll in the
# fingers), how far the command leads the joint (``lead``), and an arm posture in an IK branch
# that reaches the whole motion inside the joint limits without hitting the kitchen (found offline
# with a multi-start IK search over the motion, collisions checked with mj_forward).
_REST = (0.148, -1.768, 1.844, -2.477, 0.26, 0.713, 1.595)  # the env's initial arm pose
# a central hand pose below the hinge cabinet and above the microwave: transits whose direct
# joint-space path would hit the kitchen go through it
_HOME_POS = (-0.3, 0.35, 2.15)
_BAR_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.2])
PLANS = {
    "microwave": dict(site="microhandle_site", joint="microwave", goal=-0.75, lead=0.2, yaw=0.6, pitch=-0.6,
                      offset=(0.0, 0.0, 0.08), follow=0.6, bar=True,
                      posture=(-1.344, -1.093, 2.117, -1.945, -0.382, 1.981, 1.327)),
    # grasped from the right, hand turned left: an open hinge door leaves no room left of the handle
    "slide cabinet": dict(site="slide_site", joint="slide_cabinet", goal=0.30, lead=0.06, yaw=1.0, pitch=0.0,
                          offset=(0.0, 0.0, -0.06), bar=True,
                          posture=(1.704, -1.339, -0.935, -1.937, -0.478, 1.015, -0.524)),
    "hinge cabinet": dict(site="hinge_site2", joint="right_hinge_cabinet", goal=1.35, lead=0.2, yaw=0.0, pitch=0.0,
                          offset=(0.0, 0.0, -0.04), follow=0.6, bar=True,
                          posture=(-0.405, -1.317, 0.702, -2.301, 0.388, 1.155, 0.327)),
    "bottom burner": dict(site="knob2_site", joint="knob_Joint_2", goal=-0.8, lead=0.3, yaw=0.0, pitch=0.2,
                          offset=(0.0, 0.0, 0.0), depth=-0.04, twist=True, posture=_REST),
    # pushed, not grasped: closed fingers start right of the lever and sweep left
    "light switch": dict(site="light_site", joint="light_switch", goal=-0.6, yaw=0.0, pitch=0.0,
                         offset=(0.06, 0.0, 0.0), push=(-0.18, 0.0, 0.0), posture=_REST),
}


def positions_of(state: np.ndarray) -> np.ndarray:
    """Robot qpos (9) + object qpos (21) of a 59-d official state (a 30-d one is returned as is)."""
    return state if state.shape[-1] == 30 else np.concatenate([state[..., :9], state[..., 18:39]], axis=-1)


class KitchenExpert(Expert):
    """Scripted demonstrator: does the env's tasks one after another in a random order per episode.

    Each task is a program on the end-effector pose: a joint-space move to a pre-grasp pose (IK
    solved from the task's posture, so every task starts in an arm configuration that can finish
    it), a straight approach, grasp, a pull / turn / push that follows the object's joint, release
    and back off. Cartesian commands become joint targets by damped-least-squares IK. Object poses
    come from ``obs["state"]`` (forward kinematics on a private copy of the model), so the expert
    reacts to where doors and knobs actually are. A task not finished within its step budget is
    abandoned for the next one. Per episode the rng draws the task order and a speed factor.
    """

    def __init__(self, env: KitchenEnv):
        missing = [t for t in env.tasks if t not in PLANS]
        if missing:
            raise VqbetError(f"kitchen expert has no controller for {missing}: expected tasks from {list(PLANS)}")
        self.env = env
        self.kin = _Kinematics(env)
        self.speed = 0.035  # m per control step (0.44 m/s at 12.5 Hz)
        self.turn = 0.12  # rad per control step, end-effector orientation
        self.joint_speed = 0.10  # rad per control step for joint-space moves (env limit: 0.16)
        self.task_budget = 130
        self._q_home = self.kin.ik(np.array(_REST), np.array(_HOME_POS), gripper_rot(), iters=300, max_change=np.inf)
        self.order: list[str] = []
        self.log: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ Expert API
    def reset(self, env: "SimEnv", rng: np.random.Generator) -> None:
        if env is not self.env:
            raise VqbetError("KitchenExpert.reset: expected the env that made this expert")
        self.order = [self.env.tasks[i] for i in rng.permutation(len(self.env.tasks))]
        self.speed_scale = float(rng.uniform(0.85, 1.15))
        self.log = []  # (task, "done" | "failed" | "abandoned"), for diagnostics; the last done task is not logged
        self._program = None

    def act(self, obs: dict) -> np.ndarray:
        state = np.asarray(obs["state"], dtype=float)
        if state.shape not in ((59,), (30,)):
            raise VqbetError(f"kitchen expert: obs['state'] has shape {state.shape}, expected (59,) or (30,)")
        state = positions_of(state)  # robot qpos + object qpos
        self.kin.set_state(state)
        if self._program is None:
            self._p_cmd, self._r_cmd = self.kin.ee_pose()
            self._q_cmd = state[:7].copy()
            self._joint_goal = None
            self._ik_weights = None
            self._grip = GRIPPER_OPEN
            self._program = self._run()
        next(self._program, None)  # a finished program holds the last command
        if self._joint_goal is None:
            self._q_cmd = self.kin.ik(self._q_cmd, self._p_cmd, self._r_cmd, weights=self._ik_weights)
        target = np.concatenate([self._q_cmd, [self._grip, self._grip]])
        if self.env.action_mode == "joint_vel":
            return self.env.position_to_velocity(target).astype(np.float32)
        return target.astype(np.float32)

    # ------------------------------------------------------------------ program
    def _run(self):
        for task in self.order:
            if task in self.env.completed:  # done on the way (a door pushed open by the arm)
                self.log.append((task, "done"))
                continue
            finished = False
            for steps, _ in enumerate(self._task(task, PLANS[task]), start=1):
                if steps > self.task_budget:
                    break
                yield
            else:
                finished = True
            done = task in self.env.completed
            self.log.append((task, "done" if done else ("failed" if finished else "abandoned")))
            if not finished:  # continue from where the hand is commanded now, whatever the primitive was
                self._p_cmd, self._r_cmd = self.kin.fk(self._q_cmd)
                self._joint_goal = self._ik_weights = None
                yield from self._release_and_back_off()

    def _task(self, task: str, plan: dict):
        self.kin.q_rest = np.asarray(plan["posture"], dtype=float)  # null-space pull of the IK
        if "push" in plan:
            yield from self._push_task(plan)
        else:
            yield from self._grasp_task(plan)

    def _grasp_task(self, plan: dict):
        rot = gripper_rot(plan["yaw"], plan["pitch"])
        point = self.kin.site(plan["site"]) + np.asarray(plan["offset"]) + plan.get("depth", 0.015) * rot[:, 2]
        yield from self._transit(point - 0.12 * rot[:, 2], rot, GRIPPER_OPEN, plan["posture"])
        yield from self._move(point, rot, GRIPPER_OPEN, tol=0.02, max_steps=25)
        yield from self._hold(GRIPPER_CLOSED, 5)
        if plan.get("twist"):
            yield from self._twist(plan["joint"], plan["goal"], plan["lead"])
        else:
            if plan.get("bar"):  # the hand may turn about a grasped vertical bar
                self._ik_weights = _BAR_WEIGHTS
            yield from self._follow_joint(plan["joint"], plan["goal"], plan["lead"], plan.get("follow", 1.0))
            self._ik_weights = None
        yield from self._release_and_back_off()

    def _push_task(self, plan: dict):
        rot = gripper_rot(plan["yaw"], plan["pitch"])
        start = self.kin.site(plan["site"]) + np.asarray(plan["offset"])
        yield from self._transit(start - 0.12 * rot[:, 2], rot, GRIPPER_CLOSED, plan["posture"])
        yield from self._move(start, rot, GRIPPER_CLOSED, tol=0.01, max_steps=20)
        end = start + np.asarray(plan["push"])
        for _ in range(40):
            if self._joint_value(plan["joint"]) <= plan["goal"]:
                break
            self._step_toward(end, rot)
            yield
        yield from self._move(self._p_cmd - 0.12 * rot[:, 2], rot, tol=0.03, max_steps=15)

    # ------------------------------------------------------------------ primitives (one yield per control step)
    def _joint_value(self, joint: str) -> float:
        return float(self.kin.d.joint(joint).qpos[0])

    def _step_toward(self, pos: np.ndarray, rot: np.ndarray) -> None:
        """Advance the Cartesian command toward (pos, rot) by at most one step of the speed limits."""
        self._joint_goal = None
        delta = pos - self._p_cmd
        dist = float(np.linalg.norm(delta))
        v = self.speed * self.speed_scale
        self._p_cmd = pos.copy() if dist <= v else self._p_cmd + delta * (v / dist)
        err = _rot_error(self._r_cmd, rot)
        ang = float(np.linalg.norm(err))
        if ang <= self.turn:
            self._r_cmd = rot.copy()
        else:
            u, _, vt = np.linalg.svd(_rot(err, self.turn) @ self._r_cmd)  # re-orthonormalize
            self._r_cmd = u @ vt

    def _move(self, pos, rot, grip=None, tol=0.01, max_steps=60):
        """Straight-line move of the command to (pos, rot), then wait until the hand is within ``tol``."""
        pos = np.asarray(pos, dtype=float)
        if grip is not None:
            self._grip = grip
        for _ in range(max_steps):
            self._step_toward(pos, rot)
            yield
            if np.allclose(self._p_cmd, pos) and np.linalg.norm(self.kin.ee_pose()[0] - pos) < tol:
                return

    def _hold(self, grip: float, steps: int):
        self._grip = grip
        for _ in range(steps):
            yield

    def _release_and_back_off(self, distance: float = 0.12):
        yield from self._hold(GRIPPER_OPEN, 3)
        yield from self._move(self._p_cmd - distance * self._r_cmd[:, 2], self._r_cmd, tol=0.03, max_steps=15)

    def _transit(self, pos, rot, grip, posture):
        """Joint-space move to the IK solution of (pos, rot) near ``posture``; via home if the direct path collides."""
        q_goal = self.kin.ik(np.asarray(posture, dtype=float), pos, rot, iters=300, max_change=np.inf)
        if np.linalg.norm(self.kin.fk(q_goal)[0] - pos) > 0.03:  # no solution near the posture: go in Cartesian space
            yield from self._move(pos, rot, grip, tol=0.015, max_steps=60)
            return
        self._grip = grip
        if not self.kin.path_clear(self._q_cmd, q_goal):
            yield from self._joint_move(self._q_home, tol=0.05)
        yield from self._joint_move(q_goal, tol=0.015)
        self._p_cmd, self._r_cmd = self.kin.fk(q_goal)
        self._joint_goal = None

    def _joint_move(self, q_goal, tol, max_steps=60):
        """Joint-space straight line to ``q_goal`` at the joint speed limit, until the hand is within ``tol`` of it."""
        pos = self.kin.fk(q_goal)[0]
        self._joint_goal = q_goal
        for _ in range(max_steps):
            delta = q_goal - self._q_cmd
            biggest = float(np.abs(delta).max())
            step = self.joint_speed * self.speed_scale
            self._q_cmd = q_goal.copy() if biggest <= step else self._q_cmd + delta * (step / biggest)
            yield
            if biggest <= step and np.linalg.norm(self.kin.ee_pose()[0] - pos) < tol:
                return

    def _twist(self, joint: str, goal: float, lead: float, max_steps: int = 40):
        """Turn a grasped knob with the last arm joint alone (its axis is the hand's approach axis)."""
        _, axis, q0 = self.kin.joint(joint)
        z7 = self.kin.d.body("panda0_link7").xmat.reshape(3, 3)[:, 2]
        ratio = float(np.dot(axis, z7))  # wrist turn per unit of knob turn, +-1 when aligned
        q_start = self._q_cmd.copy()
        sign = 1.0 if goal > q0 else -1.0
        for _ in range(max_steps):
            q = self._joint_value(joint)
            if sign * (q - goal) >= 0:
                break
            target = q + sign * lead
            q_goal = q_start.copy()
            q_goal[6] = np.clip(q_start[6] + ratio * (target - q0), self.kin.lo[6], self.kin.hi[6])
            self._joint_goal = q_goal
            self._q_cmd = self._q_cmd + np.clip(q_goal - self._q_cmd, -self.turn, self.turn)
            yield
        self._p_cmd, self._r_cmd = self.kin.fk(self._q_cmd)
        self._joint_goal = None

    def _follow_joint(self, joint: str, goal: float, lead: float, follow: float = 1.0, max_steps: int = 60):
        """With the handle grasped, move the hand along the object's joint until it passes ``goal``.

        Hinge: the grasp pose rotates about the joint axis (the hand's orientation by ``follow`` of
        the angle); slide: it translates along the axis. The command leads the measured joint
        value by ``lead`` so the hand keeps pulling the handle along.
        """
        anchor, axis, q0 = self.kin.joint(joint)
        is_slide = self.env.model.jnt_type[self.env.model.joint(joint).id] == mujoco.mjtJoint.mjJNT_SLIDE
        p0, r0 = self._p_cmd.copy(), self._r_cmd.copy()
        sign = 1.0 if goal > q0 else -1.0
        for _ in range(max_steps):
            q = self._joint_value(joint)
            if sign * (q - goal) >= 0:
                return
            q_cmd = q + sign * lead
            q_cmd = min(q_cmd, goal + 0.5 * lead) if sign > 0 else max(q_cmd, goal - 0.5 * lead)
            if is_slide:
                pos, rot = p0 + axis * (q_cmd - q0), r0
            else:
                pos = anchor + _rot(axis, q_cmd - q0) @ (p0 - anchor)
                rot = _rot(axis, follow * (q_cmd - q0)) @ r0
            self._step_toward(pos, rot)
            yield
