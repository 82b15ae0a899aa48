"""Checkpoint -> exported model folder (DESIGN.md section 4), with an end-to-end parity check.

What goes in the graph and what does not: ``policy.onnx`` is the deterministic part (history
[+ goal] -> code logits, secondary-given-primary logits, per-code offsets); sampling and decoding stay
outside (seeded numpy in the runtime), and decoding needs no network because every code tuple's
decoded chunk is precomputed into ``decode_table`` (``Policy.decode_table``). Normalization stats,
the decode table and named goal vectors go into ``arrays.npz`` (``np.load(allow_pickle=False)``).

Parity (``max_abs_error``): random raw observations are pushed through the torch path (preprocess,
torch encoder, normalize, fuse, history, ``policy.heads``, torch decoding) and through the real
runtime (``PolicyRuntime.observe`` / ``heads`` / ``decode``, onnxruntime on the CPU) step by step,
with the *same* codes (sampled on the torch side) decoded on both sides; the error is the max abs
difference of the unnormalized actions.

The folder is built next to ``out`` and renamed into place at the end, so a failed export never
leaves a half-written model folder behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from vqbet_core import __version__
from vqbet_core.errors import VqbetError
from vqbet_core.runtime.spec import ARRAYS_NPZ, ENCODER_ONNX, FORMAT, MODEL_YAML, POLICY_ONNX, sha256_file

DEFAULT_OPSET = 17
PARITY_TARGET = 1e-4


class HeadsGraph(nn.Module):
    """``Policy.heads`` as a module with plain tensor outputs, for the ONNX exporter."""

    def __init__(self, policy, with_goal: bool, with_secondary: bool, with_completion: bool = False):
        super().__init__()
        self.policy = policy
        self.with_goal = with_goal
        self.with_secondary = with_secondary
        self.with_completion = with_completion

    def forward(self, obs: torch.Tensor, goal: torch.Tensor | None = None):
        h = self.policy.heads(obs, goal if self.with_goal else None)
        out = (h.logits,) + ((h.secondary_given_primary,) if self.with_secondary else ()) + (h.offsets,)
        return out + ((h.completion,) if self.with_completion else ())


def check_onnx_file(path: Path) -> None:
    """The ONNX checker (full check: shape inference too); a failure is one line."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VqbetError(f"{path}: the ONNX checker rejects the exported graph ({first[:200]})") from None


def export_policy_onnx(policy, path: Path, opset: int = DEFAULT_OPSET) -> list[str]:
    """Export ``policy.heads`` (dynamic batch) with the legacy exporter; returns the output names."""
    policy = policy.eval()
    dummy = torch.zeros(2, policy.obs_window, policy.obs_dim)
    with torch.no_grad():
        probe = policy.heads(dummy, torch.zeros(2, policy.goal_dim) if policy.goal_dim else None)
    with_secondary = probe.secondary_given_primary is not None
    with_completion = probe.completion is not None
    graph = HeadsGraph(policy, policy.goal_dim > 0, with_secondary, with_completion).eval()
    names_in = ["obs"] + (["goal"] if policy.goal_dim else [])
    names_out = (["logits"] + (["secondary_given_primary"] if with_secondary else []) + ["offsets"]
                 + (["completion"] if with_completion else []))
    args = (dummy, torch.zeros(2, policy.goal_dim)) if policy.goal_dim else (dummy,)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python-level shape checks
        torch.onnx.export(graph, args, str(path), dynamo=False, opset_version=opset, input_names=names_in,
                          output_names=names_out, dynamic_axes={n: {0: "batch"} for n in names_in + names_out})
    return names_out


# ---------------------------------------------------------------------- metadata
def _joint_names(attrs: dict, action_key: str, action_dim: int) -> tuple[list[str], str]:
    names = attrs.get("joint_names")
    if isinstance(names, list) and len(names) == action_dim and all(isinstance(n, str) for n in names):
        return list(names), "dataset"
    return [f"{action_key}_{i}" for i in range(action_dim)], "generated (dataset has no joint_names of the action size)"


def _goal_vectors(meta: dict, goal_dim: int) -> dict[str, np.ndarray]:
    """Named goals from the dataset attrs ``goal_vectors: {name: vector}`` (checkpoint meta, else the dataset)."""
    if not goal_dim:
        return {}
    raw = (meta.get("dataset_attrs") or {}).get("goal_vectors")
    data_path = meta.get("data_path")
    if raw is None and data_path and Path(data_path).exists():
        from vqbet_core.data.store import ZarrDataset

        try:
            raw = ZarrDataset.open(data_path, "r").attrs.get("goal_vectors")
        except VqbetError:
            raw = None
    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise VqbetError(f"dataset attrs goal_vectors must be a mapping {{name: vector}}, got {type(raw).__name__}")
    out = {}
    for name, vec in raw.items():
        arr = np.asarray(vec, dtype=np.float32).reshape(-1)
        if arr.shape != (goal_dim,) or not np.all(np.isfinite(arr)):
            raise VqbetError(f"dataset attrs goal_vectors['{name}'] must have {goal_dim} finite numbers (the goal size), got {np.shape(vec)}")
        out[str(name)] = arr
    return out


def _camera_preprocess(cfg: dict, meta: dict, image_size=None) -> dict:
    from vqbet_core.vision.encoder import image_size_wh
    from vqbet_core.vision.preprocess import ImagePreprocess, dataset_camera_preprocess

    attrs = meta.get("dataset_attrs") or {}
    w, h = image_size_wh(cfg["vision"]["image_size"])
    out = {}
    for key in meta["image_keys"]:
        pre = dataset_camera_preprocess(attrs, key, (h, w), (w, h))
        if image_size is not None:
            pre = ImagePreprocess(size=image_size_wh(image_size), crop=pre.crop, mean=pre.mean, std=pre.std)
        out[key] = pre
    sizes = {p.size for p in out.values()}
    if len(sizes) > 1:
        raise VqbetError(f"cameras {list(out)} have different image sizes {sorted(sizes)}: one encoder.onnx needs one size")
    return out


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"vqbet": __version__, "torch": str(torch.__version__), "onnx": str(onnx.__version__),
            "onnxruntime": str(onnxruntime.__version__), "numpy": str(np.__version__), "python": platform.python_version()}


def _last_metrics(run_dir: Path) -> dict:
    """The last logged phase-2 record (and its validation numbers) from ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    last = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("phase") == 2:
                last = rec
    return {k: round(float(v), 6) for k, v in last.items() if isinstance(v, (int, float)) and k != "phase"}


# ---------------------------------------------------------------------- parity
@torch.no_grad()
def parity_check(out_dir: Path, policy, normalizer, encoder, steps: int = 16, seed: int = 0) -> dict:
    """Torch vs the onnxruntime runtime on the same raw observations and the same sampled codes."""
    from vqbet_core.history import ObservationHistory
    from vqbet_core.models.sampling import choose_codes, decode_codes
    from vqbet_core.runtime.policy import PolicyRuntime
    from vqbet_core.vision.fusion import fuse_observation

    rt = PolicyRuntime(out_dir, providers=["CPUExecutionProvider"], seed=seed, temperature=0.0)
    spec = rt.spec
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    table = policy.decode_table()
    history = ObservationHistory(spec.obs_window)
    stats = normalizer.stats

    def raw(key: str) -> np.ndarray:
        return (stats[key]["mean"] + stats[key]["std"] * rng.standard_normal(stats[key]["mean"].shape)).astype(np.float32)

    goal_t = None
    if spec.goal_dim:
        goal_raw = raw("goal")
        rt.set_goal(goal_raw)
        goal_t = torch.from_numpy(normalizer.normalize("goal", goal_raw)[None].astype(np.float32))
    err = {"actions": 0.0, "logits": 0.0, "offsets": 0.0, "secondary_given_primary": 0.0, "completion": 0.0}
    argmax_agree = 0
    for step in range(steps):
        lowdim = {k: raw(k) for k in spec.obs_keys}
        images = {}
        for key, pre in spec.preprocess.items():
            w, h = pre.size if pre.crop is None else (pre.crop[0] + pre.crop[2] + 7, pre.crop[1] + pre.crop[3] + 5)
            images[key] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        rt.observe(lowdim, images, stamp=step * spec.period)
        heads_o = rt.heads()
        # torch path, independent of the runtime's code except the shared numpy helpers
        low = {k: normalizer.normalize(k, v.reshape(1, -1)) for k, v in lowdim.items()}
        feats = {}
        for key, pre in spec.preprocess.items():
            x = torch.from_numpy(pre.to_model_input(pre.crop_resize(images[key])[None]))
            feats[key] = normalizer.normalize(key, encoder(x).numpy())
        hist = history.push(fuse_observation(low, feats, spec.obs_keys, spec.image_keys)[0].astype(np.float32))
        heads_t = policy.heads(torch.from_numpy(hist[None]), goal_t)
        codes = choose_codes(heads_t, 1.0, gen, spec.sequential)
        act_t = normalizer.unnormalize("action", decode_codes(heads_t, table, codes, spec.action_chunk, spec.action_dim)[0].numpy())
        act_o = rt.decode(heads_o, codes[0].numpy())
        err["actions"] = max(err["actions"], float(np.max(np.abs(act_t - act_o))))
        err["logits"] = max(err["logits"], float(np.max(np.abs(heads_t.logits.numpy() - heads_o["logits"]))))
        err["offsets"] = max(err["offsets"], float(np.max(np.abs(heads_t.offsets.numpy() - heads_o["offsets"]))))
        if heads_t.completion is not None:
            err["completion"] = max(err["completion"], float(np.max(np.abs(heads_t.completion.numpy() - heads_o["completion"]))))
        if heads_t.secondary_given_primary is not None:
            err["secondary_given_primary"] = max(err["secondary_given_primary"], float(np.max(np.abs(
                heads_t.secondary_given_primary.numpy() - heads_o["secondary_given_primary"]))))
        argmax_agree += int(np.array_equal(rt.choose_codes(heads_o), choose_codes(heads_t, 0.0, None, spec.sequential)[0].numpy()))
    # a batch size other than the export's, straight through the policy graph
    obs = rng.standard_normal((3, spec.obs_window, spec.obs_dim)).astype(np.float32)
    feed = {"obs": obs}
    goal_b = None
    if spec.goal_dim:
        feed["goal"] = goal_b = rng.standard_normal((3, spec.goal_dim)).astype(np.float32)
    got = rt.policy_session.run(["logits"], feed)[0]
    want = policy.heads(torch.from_numpy(obs), None if goal_b is None else torch.from_numpy(goal_b)).logits.numpy()
    return {"max_abs_error": err["actions"], "steps": steps, "logits_max_abs_error": err["logits"],
            "offsets_max_abs_error": err["offsets"], "secondary_max_abs_error": err["secondary_given_primary"],
            "completion_max_abs_error": err["completion"],
            "batch3_logits_max_abs_error": float(np.max(np.abs(got - want))),
            "argmax_codes_agree": f"{argmax_agree}/{steps}", "target": PARITY_TARGET}


# ---------------------------------------------------------------------- the export
def _prepare_out(out: Path) -> Path:
    if out.exists() and not (out.is_dir() and ((out / MODEL_YAML).exists() or not any(out.iterdir()))):
        raise VqbetError(f"--out {out} exists and is not an exported model folder (refusing to replace it)")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def export_model(checkpoint: str | Path, out: str | Path, name: str | None = None, opset: int = DEFAULT_OPSET,
                 parity_steps: int = 16, max_error: float = 1e-3, seed: int = 0, image_size=None,
                 eval_results: list[dict] | None = None, metadata: dict | None = None) -> dict:
    """Write ``out`` (policy.onnx, encoder.onnx for image models, arrays.npz, model.yaml, card.md).

    Returns the export report (files, parity figures). Raises ``VqbetError`` when the parity error
    exceeds ``max_error``. ``image_size`` retargets the image preprocessing and encoder to another size:
    for latency benchmarks only (the policy was trained on features of the original size). ``metadata``:
    dataset attrs that replace the checkpoint's (``joint_names``, ``control_hz``: ``vqbet export --joint-names``).
    """
    from vqbet_core.export.model_card import write_card
    from vqbet_core.train.checkpoint import load_policy

    if opset < 17:
        raise VqbetError(f"--opset must be >= 17, got {opset}")
    run_dir, out = Path(checkpoint), Path(out)
    policy, normalizer, cfg, meta, encoder = load_policy(run_dir, "cpu")
    policy.eval()
    tmp = _prepare_out(out)
    t_start = time.perf_counter()
    try:
        names_out = export_policy_onnx(policy, tmp / POLICY_ONNX, opset)
        check_onnx_file(tmp / POLICY_ONNX)
        files = {"policy": {"file": POLICY_ONNX}}
        preprocess = _camera_preprocess(cfg, meta, image_size) if meta["image_keys"] else {}
        encoder_err = None
        if meta["image_keys"]:
            from vqbet_core.vision.encoder import ARCH, FEATURE_DIM, export_encoder_onnx

            size = next(iter(preprocess.values())).size
            encoder_err = export_encoder_onnx(encoder, list(size), tmp / ENCODER_ONNX, opset=opset)
            check_onnx_file(tmp / ENCODER_ONNX)
            files["encoder"] = {"file": ENCODER_ONNX, "arch": ARCH, "fingerprint": encoder.fingerprint(),
                                "input": [None, 3, size[1], size[0]], "output": [None, FEATURE_DIM]}
        table = policy.decode_table().cpu().numpy().astype(np.float32)
        goals = _goal_vectors(meta, policy.goal_dim)
        arrays = {f"norm/{k}": np.asarray(v, np.float32) for k, v in normalizer.to_flat().items()}
        arrays["decode_table"] = table
        arrays.update({f"goal/{n}": v for n, v in goals.items()})
        np.savez(tmp / ARRAYS_NPZ, **arrays)
        files["arrays"] = {"file": ARRAYS_NPZ}
        for entry in files.values():
            entry["sha256"] = sha256_file(tmp / entry["file"])

        attrs = {**dict(meta.get("dataset_attrs") or {}), **dict(metadata or {})}
        joint_names, joint_source = _joint_names(attrs, meta["action_key"], meta["action_dim"])
        joint_source = "vqbet export --joint-names" if "joint_names" in (metadata or {}) else joint_source
        control_hz = attrs.get("control_hz")
        hz_source = "vqbet export --control-hz" if "control_hz" in (metadata or {}) else "dataset"
        if not isinstance(control_hz, (int, float)) or isinstance(control_hz, bool) or control_hz <= 0:
            control_hz, hz_source = 10.0, "default (the dataset has no control_hz)"
        n_layers = 1 if table.ndim == 2 else table.ndim - 1
        sequential = "secondary_given_primary" in names_out and bool(cfg.get("sampling", {}).get("sequential", True))
        obs_dims = {k: int(normalizer.stats[k]["mean"].shape[0]) for k in meta["obs_keys"]}
        model = {
            "format": FORMAT,
            "name": name or out.name,
            "kind": meta.get("kind", cfg["policy"]),
            "obs_keys": list(meta["obs_keys"]),
            "obs_dims": obs_dims,
            "image_keys": list(meta["image_keys"]),
            "images": {k: p.to_dict() for k, p in preprocess.items()},
            "image_feature_dim": 512 if meta["image_keys"] else 0,
            "obs_dim": int(meta["obs_dim"]),
            "obs_window": int(policy.obs_window),
            "history_padding": "repeat the episode's first observation until obs_window steps are seen",
            "action_key": meta["action_key"],
            "action_dim": int(meta["action_dim"]),
            "action_chunk": int(policy.action_chunk),
            "joint_names": joint_names,
            "joint_names_source": joint_source,
            "control_hz": float(control_hz),
            "control_hz_source": hz_source,
            "goal_dim": int(policy.goal_dim),
            "goal_key": meta.get("goal_key"),
            "goal_names": sorted(goals),
            # policy.onnx output `completion` (B,): P(the current subtask ends within `horizon` steps)
            "completion": ({"horizon": int(cfg["completion"]["horizon"]), "output": "completion"}
                           if "completion" in names_out else None),
            "codes": {"layers": int(n_layers), "n_codes": int(table.shape[0]), "sequential": sequential},
            "sampling": {"temperature": float(cfg["sampling"]["temperature"]), "sequential": sequential,
                         "blend": str(cfg["sampling"].get("blend", "average"))},
            "files": files,
            "data_hash": meta.get("data_hash"),
            "dataset_attrs": attrs,
            "training": {"run": str(run_dir.resolve()), "config_name": cfg.get("name"), "data_path": meta.get("data_path"),
                         "phase1_step": meta.get("phase1_step"), "phase2_step": meta.get("phase2_step"),
                         "n_train_episodes": meta.get("n_train_episodes"), "n_val_episodes": meta.get("n_val_episodes"),
                         "last_metrics": _last_metrics(run_dir), "versions": meta.get("versions", {}), "config": cfg},
            "export": {"opset": opset, "exporter": "torch.onnx legacy (TorchScript tracing)",
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "image_size_override": image_size is not None},
            "versions": _versions(),
        }
        (tmp / MODEL_YAML).write_text(yaml.safe_dump(model, sort_keys=False))
        parity = parity_check(tmp, policy, normalizer, encoder, steps=parity_steps, seed=seed)
        if encoder_err is not None:
            parity["encoder_max_abs_error"] = encoder_err
        model["export"]["parity"] = parity
        (tmp / MODEL_YAML).write_text(yaml.safe_dump(model, sort_keys=False))
        if not parity["max_abs_error"] <= max_error:
            raise VqbetError(f"export parity failed: max abs action error torch vs onnxruntime is {parity['max_abs_error']:.3g} (> {max_error:g})")
        write_card(tmp / "card.md", model, eval_results or [])
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"model": str(out), "kind": model["kind"], "files": sorted(p.name for p in out.iterdir()),
            "max_abs_error": parity["max_abs_error"], "parity": parity, "seconds": round(time.perf_counter() - t_start, 2)}
