"""Point-mass multipath tasks from the BeT paper (appendix A): the smallest multimodal benchmark.

Why it exists: the demonstrations reach one goal by several routes around obstacles, so a policy that
averages the modes (heads straight for the goal) runs into an obstacle and fails, while a multimodal
policy should reproduce the routes at the demonstrations' frequencies.

- ``fork``: start (1, 2), goal (5, 2), one block in between; the route forks at (2, 2) and passes
  above ("up") or below ("down") the block, then rejoins (the paper's first point-mass dataset).
- ``zpaths``: start (0, 0), goal (8, 8), blocks on the diagonal around (2, 2) and (6, 6); three
  Z-shaped routes that cross at (4, 4) - "up-right-up", "right-up-right" and "right-up-right-up" -
  so at the crossing only the history tells which way to go (the point of the paper's second one).

Observation ``state`` = position (x, y); action = displacement (dx, dy), clipped to ``max_step``. A
move whose segment enters an obstacle stops just before it (no sliding), so pushing into an obstacle
gets nowhere. The route label is read off the trajectory (which side of each obstacle it passed), so
it works for policy rollouts as well as for the expert.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vqbet_core.errors import VqbetError
from vqbet_core.sim.base import EpisodeResult, Expert, SimEnv, mode_frequencies

CONTROL_HZ = 10
_BACKOFF = 1e-4  # how far (world units) a blocked move stops before the obstacle face

# Each gate labels one obstacle: the first trajectory point with dot(p, normal) >= threshold tells on
# which side it passed (sign of dot(p - center, side_axis)): positive -> labels[0], else labels[1].
VARIANTS: dict[str, dict] = {
    "fork": {
        "start": (1.0, 2.0),
        "goal": (5.0, 2.0),
        "bounds": ((0.0, -1.0), (6.0, 5.0)),
        "obstacles": [(2.5, 0.7, 3.5, 3.3)],
        "routes": {
            "up": [(2.0, 2.0), (2.0, 4.0), (4.0, 4.0), (4.0, 2.0), (5.0, 2.0)],
            "down": [(2.0, 2.0), (2.0, 0.0), (4.0, 0.0), (4.0, 2.0), (5.0, 2.0)],
        },
        "gates": [{"center": (3.0, 2.0), "normal": (1.0, 0.0), "side_axis": (0.0, 1.0), "labels": ("up", "down")}],
        "labels": {("up",): "up", ("down",): "down"},
        "max_steps": 100,
    },
    "zpaths": {
        "start": (0.0, 0.0),
        "goal": (8.0, 8.0),
        "bounds": ((-1.0, -1.0), (9.0, 9.0)),
        "obstacles": [(0.8, 0.8, 3.2, 3.2), (4.8, 4.8, 7.2, 7.2)],
        "routes": {
            "up-right-up": [(0.0, 4.0), (4.0, 4.0), (8.0, 4.0), (8.0, 8.0)],
            "right-up-right": [(4.0, 0.0), (4.0, 4.0), (4.0, 8.0), (8.0, 8.0)],
            "right-up-right-up": [(4.0, 0.0), (4.0, 4.0), (8.0, 4.0), (8.0, 8.0)],
        },
        "gates": [
            {"center": (2.0, 2.0), "normal": (1.0, 1.0), "side_axis": (-1.0, 1.0), "labels": ("up", "right")},
            {"center": (6.0, 6.0), "normal": (1.0, 1.0), "side_axis": (-1.0, 1.0), "labels": ("up", "right")},
        ],
        # the fourth combination is no demonstrated route: only a policy that mixes routes at the
        # crossing (4, 4) - e.g. one without history - produces it
        "labels": {
            ("up", "right"): "up-right-up",
            ("right", "up"): "right-up-right",
            ("right", "right"): "right-up-right-up",
            ("up", "up"): "up-right-up-right",
        },
        "max_steps": 200,
    },
}


def _segment_entry(p: np.ndarray, d: np.ndarray, box: tuple) -> float | None:
    """Fraction t in [0, 1] of the move ``p -> p + d`` at which it enters ``box``, or None (slab test)."""
    lo = np.array(box[:2])
    hi = np.array(box[2:])
    t_enter, t_exit = -np.inf, np.inf
    for axis in range(2):
        if abs(d[axis]) < 1e-12:
            if p[axis] <= lo[axis] or p[axis] >= hi[axis]:
                return None
            continue
        t0 = (lo[axis] - p[axis]) / d[axis]
        t1 = (hi[axis] - p[axis]) / d[axis]
        t_enter = max(t_enter, min(t0, t1))
        t_exit = min(t_exit, max(t0, t1))
    if t_enter >= t_exit or t_exit <= 0 or t_enter > 1:
        return None
    return max(t_enter, 0.0)


def label_trajectory(positions: np.ndarray, variant: str) -> str | None:
    """Route label of a trajectory ``(T, 2)``: which side of each obstacle it passed first; None if unfinished."""
    spec = VARIANTS[variant]
    positions = np.asarray(positions, np.float64).reshape(-1, 2)
    sides = []
    for gate in spec["gates"]:
        normal = np.array(gate["normal"])
        center = np.array(gate["center"])
        past = np.nonzero(positions @ normal >= center @ normal)[0]
        if len(past) == 0:
            return None
        side = (positions[past[0]] - center) @ np.array(gate["side_axis"])
        sides.append(gate["labels"][0] if side > 0 else gate["labels"][1])
    return spec["labels"].get(tuple(sides))


class MultipathExpert(Expert):
    """Picks a route uniformly at random and follows its (jittered) waypoints with Gaussian action noise."""

    def __init__(self, noise: float, speed: tuple[float, float] = (0.18, 0.22), waypoint_jitter: float = 0.15):
        self.noise = noise
        self.speed_range = speed
        self.waypoint_jitter = waypoint_jitter
        self.route: str | None = None

    def reset(self, env: "MultipathEnv", rng: np.random.Generator) -> None:
        self.rng = rng
        self.max_step = env.max_step
        names = sorted(env.routes)
        self.route = names[int(rng.integers(len(names)))]
        points = np.array(env.routes[self.route], np.float64)
        jitter = rng.uniform(-self.waypoint_jitter, self.waypoint_jitter, size=points.shape)
        jitter[-1] = 0.0  # the goal itself is exact
        self.waypoints = points + jitter
        self.speed = float(rng.uniform(*self.speed_range))
        self.index = 0

    def act(self, obs: dict) -> np.ndarray:
        pos = np.asarray(obs["state"], np.float64)
        # cut a corner when the waypoint is within one step: smoother, and never stalls on it
        while self.index < len(self.waypoints) - 1 and np.linalg.norm(self.waypoints[self.index] - pos) < self.speed:
            self.index += 1
        delta = self.waypoints[self.index] - pos
        dist = float(np.linalg.norm(delta))
        action = delta / dist * min(self.speed, dist) if dist > 1e-9 else np.zeros(2)
        action = action + self.rng.normal(0.0, self.noise, size=2)
        norm = float(np.linalg.norm(action))
        if norm > self.max_step:
            action *= self.max_step / norm
        return action.astype(np.float32)


class MultipathEnv(SimEnv):
    """2D point mass among axis-aligned obstacles; see the module docstring for the variants."""

    name = "multipath"

    def __init__(self, variant: str = "fork", noise: float = 0.03, max_steps: int | None = None,
                 max_step: float = 0.3, success_radius: float = 0.3, start_jitter: float = 0.1,
                 render_size: int = 128):
        if variant not in VARIANTS:
            raise VqbetError(f"multipath variant '{variant}' is unknown (expected one of: {', '.join(VARIANTS)})")
        for label, value in (("noise", noise), ("start_jitter", start_jitter)):
            if not isinstance(value, (int, float)) or value < 0:
                raise VqbetError(f"multipath {label} must be a number >= 0, got {value!r}")
        for label, value in (("max_step", max_step), ("success_radius", success_radius)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise VqbetError(f"multipath {label} must be a number > 0, got {value!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise VqbetError(f"multipath max_steps must be an integer >= 1, got {max_steps!r}")
        if not isinstance(render_size, int) or render_size < 16:
            raise VqbetError(f"multipath render_size must be an integer >= 16, got {render_size!r}")
        spec = VARIANTS[variant]
        self.variant = variant
        self.noise = float(noise)
        self.max_step = float(max_step)
        self.success_radius = float(success_radius)
        self.start_jitter = float(start_jitter)
        self.render_size = render_size
        self.start_pos = np.array(spec["start"], np.float64)
        self.goal_pos = np.array(spec["goal"], np.float64)
        self.bounds = np.array(spec["bounds"], np.float64)
        self.obstacles = [tuple(map(float, box)) for box in spec["obstacles"]]
        self.routes = {k: [tuple(p) for p in v] for k, v in spec["routes"].items()}
        self._max_steps = int(max_steps or spec["max_steps"])
        self._rng = np.random.default_rng()
        self._positions: list[np.ndarray] = []
        self._t = 0
        self._success = False
        self._blocked = 0

    # ------------------------------------------------------------------ interface
    @property
    def obs_keys(self) -> list[str]:
        return ["state"]

    @property
    def action_dim(self) -> int:
        return 2

    @property
    def max_steps(self) -> int:
        return self._max_steps

    @property
    def trajectory(self) -> np.ndarray:
        """Positions visited so far, ``(t + 1, 2)`` float64."""
        return np.stack(self._positions)

    def _obs(self) -> dict:
        return {"state": self._positions[-1].astype(np.float32)}

    def reset(self, seed: int | None = None) -> dict:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        pos = self.start_pos + self._rng.uniform(-self.start_jitter, self.start_jitter, size=2)
        self._positions = [pos]
        self._t = 0
        self._success = False
        self._blocked = 0
        return self._obs()

    def _move(self, pos: np.ndarray, delta: np.ndarray) -> np.ndarray:
        target = np.clip(pos + delta, self.bounds[0], self.bounds[1])
        delta = target - pos
        length = float(np.linalg.norm(delta))
        if length < 1e-12:
            return pos
        hits = [t for t in (_segment_entry(pos, delta, box) for box in self.obstacles) if t is not None]
        if not hits:
            return target
        self._blocked += 1
        t = max(min(hits) - _BACKOFF / length, 0.0)
        return pos + t * delta

    def step(self, action: np.ndarray) -> tuple[dict, bool]:
        if not self._positions:
            raise RuntimeError("MultipathEnv.step() called before reset()")
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (2,):
            raise ValueError(f"multipath action must have 2 values (dx, dy), got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"multipath action is not finite: {action}")
        norm = float(np.linalg.norm(action))
        if norm > self.max_step:
            action = action * (self.max_step / norm)
        pos = self._move(self._positions[-1], action)
        self._positions.append(pos)
        self._t += 1
        if np.linalg.norm(pos - self.goal_pos) <= self.success_radius:
            self._success = True
        return self._obs(), self._success or self._t >= self._max_steps

    def result(self) -> EpisodeResult:
        final = self._positions[-1]
        return EpisodeResult(
            success=self._success,
            mode=label_trajectory(self.trajectory, self.variant),
            length=self._t,
            info={"final_distance": float(np.linalg.norm(final - self.goal_pos)), "blocked_steps": self._blocked},
        )

    def make_expert(self) -> MultipathExpert:
        return MultipathExpert(self.noise)

    def dataset_attrs(self) -> dict:
        return {"source": "sim:multipath", "variant": self.variant, "control_hz": CONTROL_HZ, "obs_keys": ["state"],
                "routes": sorted(self.routes)}

    # ------------------------------------------------------------------ pictures
    def _to_pixels(self, points: np.ndarray) -> np.ndarray:
        lo, hi = self.bounds
        s = self.render_size - 1
        uv = (np.asarray(points, np.float64) - lo) / (hi - lo)
        return np.round(np.stack([uv[..., 0] * s, (1.0 - uv[..., 1]) * s], axis=-1)).astype(np.int32)

    def render(self) -> np.ndarray:
        """Obstacles (grey), goal zone (red), start (green), path so far (blue), point (black)."""
        import cv2

        size = self.render_size
        img = np.full((size, size, 3), 255, np.uint8)
        for box in self.obstacles:
            (x0, y1), (x1, y0) = self._to_pixels(np.array([[box[0], box[1]], [box[2], box[3]]]))
            cv2.rectangle(img, (int(x0), int(y0)), (int(x1), int(y1)), (150, 150, 150), thickness=-1)
        scale = (size - 1) / float(self.bounds[1, 0] - self.bounds[0, 0])
        goal = self._to_pixels(self.goal_pos)
        cv2.circle(img, (int(goal[0]), int(goal[1])), max(2, int(round(self.success_radius * scale))), (220, 60, 60), -1)
        start = self._to_pixels(self.start_pos)
        cv2.circle(img, (int(start[0]), int(start[1])), 2, (60, 170, 60), -1)
        if self._positions:
            pts = self._to_pixels(self.trajectory)
            if len(pts) > 1:
                cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, (40, 90, 220), 1, lineType=cv2.LINE_AA)
            cv2.circle(img, (int(pts[-1, 0]), int(pts[-1, 1])), max(2, size // 48), (0, 0, 0), -1)
        return img

    @staticmethod
    def summarize(results: list[EpisodeResult], demo_modes: list[str] | None = None) -> dict:
        """Success rate, route frequencies (rollouts vs demonstrations, same keys) and their total variation."""
        modes = [r.mode for r in results]
        keys = sorted({"none" if m is None else m for m in modes + list(demo_modes or [])})
        route_freq = mode_frequencies(modes, keys)
        out = {
            "success": float(np.mean([r.success for r in results])) if results else 0.0,
            "route_freq": route_freq,
            "demo_route_freq": None,
            "episodes": len(results),
            "mean_length": float(np.mean([r.length for r in results])) if results else 0.0,
        }
        if demo_modes is not None:
            demo_freq = mode_frequencies(list(demo_modes), keys)
            out["demo_route_freq"] = demo_freq
            out["route_tv"] = 0.5 * float(sum(abs(route_freq[k] - demo_freq[k]) for k in keys))
        return out


def plot_trajectories(trajectories: list[np.ndarray], modes: list[str | None], out_png: str | Path,
                      env: MultipathEnv) -> Path:
    """Obstacles, start, goal and every trajectory coloured by its route label; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    labels = ["none" if m is None else m for m in modes]
    names = sorted(set(labels) - {"none"}) + (["none"] if "none" in labels else [])
    palette = plt.get_cmap("tab10")
    colors = {name: palette(i % 10) for i, name in enumerate(n for n in names if n != "none")}
    colors["none"] = (0.5, 0.5, 0.5, 1.0)
    fig, ax = plt.subplots(figsize=(5, 5))
    for box in env.obstacles:
        ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], color="0.6", zorder=1))
    ax.add_patch(Circle(tuple(env.goal_pos), env.success_radius, color="tab:red", alpha=0.4, zorder=1))
    ax.plot(*env.start_pos, "o", color="tab:green", zorder=3)
    for traj, label in zip(trajectories, labels):
        traj = np.asarray(traj).reshape(-1, 2)
        ax.plot(traj[:, 0], traj[:, 1], color=colors[label], alpha=0.5, linewidth=1, zorder=2)
    for name in names:
        ax.plot([], [], color=colors[name], label=f"{name} ({labels.count(name)})")
    (x0, y0), (x1, y1) = env.bounds
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_title(f"multipath {env.variant}: {len(labels)} trajectories")
    if names:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
