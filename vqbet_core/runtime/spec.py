"""``model.yaml`` of an exported model folder (DESIGN.md section 4): parsing and consistency checks.

A model folder travels alone to the robot, so everything is checked when it is loaded, and every
problem is one line naming the file and what was expected: a missing file, YAML without a needed
key, arrays whose shapes contradict the metadata, an ONNX graph whose inputs or outputs contradict
it (see :func:`check_policy_graph` / :func:`check_encoder_graph`), files changed after export.

Layout::

    model.yaml    metadata (this module), written by vqbet_core.export
    policy.onnx   obs (B, T, D) [+ goal (B, G)] -> logits (B, L, C) [, secondary_given_primary (B, C, C)], offsets (B, L, C, W*A)
                  [, completion (B,)]
    encoder.onnx  image (B, 3, H, W) -> features (B, 512)          (image models only)
    arrays.npz    norm/<key>.mean|std, decode_table (C,)*L + (W*A,), goal/<name>   (np.load, no pickle)

numpy + PyYAML only: no torch, no onnx package needed on the robot.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from vqbet_core.data.normalize import Normalizer
from vqbet_core.errors import ModelFolderError, VqbetError
from vqbet_core.vision.preprocess import ImagePreprocess

FORMAT = "vqbet-model/1"
MODEL_YAML = "model.yaml"
POLICY_ONNX = "policy.onnx"
ENCODER_ONNX = "encoder.onnx"
ARRAYS_NPZ = "arrays.npz"
POLICY_INPUTS = ("obs", "goal")
POLICY_OUTPUTS = ("logits", "secondary_given_primary", "offsets")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelSpec:
    """The parsed, checked contents of a model folder's ``model.yaml`` and ``arrays.npz``."""

    path: Path
    meta: dict
    name: str
    kind: str
    obs_keys: list[str]
    obs_dims: dict[str, int]
    image_keys: list[str]
    preprocess: dict[str, ImagePreprocess]
    feature_dim: int
    obs_dim: int
    obs_window: int
    action_dim: int
    action_chunk: int
    joint_names: list[str]
    control_hz: float
    goal_dim: int
    goal_names: list[str]
    n_layers: int
    n_codes: int
    sequential: bool
    temperature: float
    normalizer: Normalizer
    decode_table: np.ndarray
    blend: str = "average"  # default chunk blending for rollouts: average (the paper) | none
    goal_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    completion_horizon: int = 0  # > 0: policy.onnx also outputs `completion` (DESIGN.md section 9)

    @property
    def period(self) -> float:
        return 1.0 / self.control_hz

    @property
    def policy_file(self) -> Path:
        return self.path / POLICY_ONNX

    @property
    def encoder_file(self) -> Path | None:
        return self.path / ENCODER_ONNX if self.image_keys else None

    @property
    def encoder_int8_file(self) -> Path | None:
        """The int8 encoder made by ``vqbet quantize`` (hash-checked at load), or None."""
        entry = (self.meta.get("files") or {}).get("encoder_int8")
        return self.path / entry["file"] if self.image_keys and isinstance(entry, dict) and "file" in entry else None


# ---------------------------------------------------------------------- small checked readers
def _fail(where: str, what: str) -> ModelFolderError:
    return ModelFolderError(f"{where}: {what}")


def _get(meta: dict, key: str, kind, where: str):
    if key not in meta:
        raise _fail(where, f"key '{key}' is missing")
    value = meta[key]
    ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(where, f"'{key}' must be a {names}, got {value!r}")
    return value


def _positive_int(meta: dict, key: str, where: str, minimum: int = 1) -> int:
    value = _get(meta, key, int, where)
    if value < minimum:
        raise _fail(where, f"'{key}' must be >= {minimum}, got {value}")
    return value


def _str_list(meta: dict, key: str, where: str) -> list[str]:
    value = _get(meta, key, list, where)
    if not all(isinstance(v, str) for v in value):
        raise _fail(where, f"'{key}' must be a list of strings, got {value!r}")
    return list(value)


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ModelFolderError(f"{path}: file is missing (normalization stats and decode table)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelFolderError(f"{path}: not a readable .npz file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _check_file_hash(folder: Path, entry: dict, where: str, key: str) -> Path:
    f = folder / entry["file"]
    if not f.is_file():
        raise ModelFolderError(f"{f}: file is missing ({where} lists it under files.{key})")
    want = entry.get("sha256")
    if want and sha256_file(f) != want:
        raise ModelFolderError(f"{f}: file changed since export (sha256 differs from {where}); re-export the model")
    return f


# ---------------------------------------------------------------------- loading
def load_spec(model_dir: str | Path, verify_hashes: bool = True) -> ModelSpec:
    """Parse and check ``model_dir`` (raises :class:`ModelFolderError` with one line on any problem)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder not found")
    yaml_path = folder / MODEL_YAML
    where = str(yaml_path)
    if not yaml_path.is_file():
        raise ModelFolderError(f"{yaml_path}: file is missing (is {folder} an exported model folder? see vqbet export)")
    try:
        meta = yaml.safe_load(yaml_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise _fail(where, "expected a mapping at the top level")
    if meta.get("format") != FORMAT:
        raise _fail(where, f"format must be '{FORMAT}', got {meta.get('format')!r} (exported by another version?)")

    kind = _get(meta, "kind", str, where)
    obs_keys = _str_list(meta, "obs_keys", where)
    image_keys = _str_list(meta, "image_keys", where)
    if not obs_keys and not image_keys:
        raise _fail(where, "obs_keys and image_keys are both empty")
    obs_dims = _get(meta, "obs_dims", dict, where)
    if set(obs_dims) != set(obs_keys) or not all(isinstance(v, int) and v >= 1 for v in obs_dims.values()):
        raise _fail(where, f"obs_dims must give a size >= 1 for each of obs_keys {obs_keys}, got {obs_dims!r}")
    images = _get(meta, "images", dict, where)
    preprocess = {}
    for key in image_keys:
        if key not in images:
            raise _fail(where, f"images.{key} (image preprocessing) is missing")
        try:
            preprocess[key] = ImagePreprocess.from_dict(images[key])
        except (VqbetError, TypeError, ValueError) as exc:
            raise _fail(where, f"images.{key}: {exc}") from None
    feature_dim = _positive_int(meta, "image_feature_dim", where) if image_keys else 0
    obs_dim = _positive_int(meta, "obs_dim", where)
    fused = sum(obs_dims.values()) + feature_dim * len(image_keys)
    if fused != obs_dim:
        raise _fail(where, f"obs_dim is {obs_dim} but obs_dims + {len(image_keys)} x image_feature_dim add up to {fused}")
    obs_window = _positive_int(meta, "obs_window", where)
    action_dim = _positive_int(meta, "action_dim", where)
    action_chunk = _positive_int(meta, "action_chunk", where)
    joint_names = _str_list(meta, "joint_names", where)
    if len(joint_names) != action_dim:
        raise _fail(where, f"joint_names has {len(joint_names)} names but action_dim is {action_dim}")
    control_hz = _get(meta, "control_hz", (int, float), where)
    if not control_hz > 0:
        raise _fail(where, f"'control_hz' must be > 0, got {control_hz}")
    goal_dim = _positive_int(meta, "goal_dim", where, minimum=0)
    goal_names = _str_list(meta, "goal_names", where)
    codes = _get(meta, "codes", dict, where)
    n_layers = _positive_int(codes, "layers", f"{where}: codes")
    n_codes = _positive_int(codes, "n_codes", f"{where}: codes")
    sequential = bool(codes.get("sequential", False))
    sampling = _get(meta, "sampling", dict, where)
    temperature = _get(sampling, "temperature", (int, float), f"{where}: sampling")
    blend = str(sampling.get("blend", "average"))
    if blend not in ("average", "none"):
        raise _fail(where, f"sampling.blend must be average or none, got {blend!r}")
    files = _get(meta, "files", dict, where)
    for key in ("policy", "arrays") + (("encoder",) if image_keys else ()):
        if not isinstance(files.get(key), dict) or not isinstance(files[key].get("file"), str):
            raise _fail(where, f"files.{key}.file is missing")

    arrays_path = folder / files["arrays"]["file"]
    if verify_hashes and arrays_path.is_file():
        _check_file_hash(folder, files["arrays"], where, "arrays")
    arrays = _load_arrays(arrays_path)
    norm = {}
    for name, value in arrays.items():
        if name.startswith("norm/"):
            norm[name[len("norm/"):]] = value
    try:
        normalizer = Normalizer.from_flat(norm)
    except VqbetError as exc:
        raise ModelFolderError(f"{arrays_path}: {exc}") from None
    expected = {**obs_dims, **{k: feature_dim for k in image_keys}, "action": action_dim}
    if goal_dim:
        expected["goal"] = goal_dim
    for key, dim in expected.items():
        if key not in normalizer.stats:
            raise ModelFolderError(f"{arrays_path}: normalization stats for '{key}' are missing")
        for stat in ("mean", "std"):
            shape = normalizer.stats[key][stat].shape
            if shape != (dim,):
                raise ModelFolderError(f"{arrays_path}: norm/{key}.{stat} has shape {shape}, model.yaml implies ({dim},)")
        if not np.all(np.isfinite(normalizer.stats[key]["mean"])) or not np.all(normalizer.stats[key]["std"] > 0):
            raise ModelFolderError(f"{arrays_path}: norm/{key} must have finite means and positive stds")
    if "decode_table" not in arrays:
        raise ModelFolderError(f"{arrays_path}: decode_table is missing")
    table = arrays["decode_table"].astype(np.float32)
    want = (n_codes,) * n_layers + (action_chunk * action_dim,)
    if table.shape != want:
        raise ModelFolderError(f"{arrays_path}: decode_table has shape {table.shape}, model.yaml implies {want}")
    goal_vectors = {}
    for name in goal_names:
        vec = arrays.get(f"goal/{name}")
        if vec is None or vec.shape != (goal_dim,):
            got = None if vec is None else vec.shape
            raise ModelFolderError(f"{arrays_path}: goal/{name} must be a vector of {goal_dim} numbers, got {got}")
        goal_vectors[name] = vec.astype(np.float32)

    _check_file_hash(folder, files["policy"], where, "policy") if verify_hashes else None
    if image_keys and verify_hashes:
        _check_file_hash(folder, files["encoder"], where, "encoder")
        if isinstance(files.get("encoder_int8"), dict):
            _check_file_hash(folder, files["encoder_int8"], where, "encoder_int8")
    for key in ("policy",) + (("encoder",) if image_keys else ()):
        if not (folder / files[key]["file"]).is_file():
            raise ModelFolderError(f"{folder / files[key]['file']}: file is missing ({where} lists it under files.{key})")

    completion = meta.get("completion")
    if completion is not None and not (isinstance(completion, dict) and isinstance(completion.get("horizon"), int)
                                       and completion["horizon"] > 0):
        raise _fail(where, f"completion must be null or {{horizon: steps > 0, output: completion}}, got {completion!r}")
    completion_horizon = int(completion["horizon"]) if completion else 0

    return ModelSpec(path=folder, meta=meta, name=str(meta.get("name", folder.name)), kind=kind, obs_keys=obs_keys,
                     obs_dims={k: int(v) for k, v in obs_dims.items()}, image_keys=image_keys, preprocess=preprocess,
                     feature_dim=feature_dim, obs_dim=obs_dim, obs_window=obs_window, action_dim=action_dim,
                     action_chunk=action_chunk, joint_names=joint_names, control_hz=float(control_hz), goal_dim=goal_dim,
                     goal_names=goal_names, n_layers=n_layers, n_codes=n_codes, sequential=sequential,
                     temperature=float(temperature), blend=blend, normalizer=normalizer, decode_table=table, goal_vectors=goal_vectors,
                     completion_horizon=completion_horizon)


# ---------------------------------------------------------------------- graph checks
def _dims(shape) -> list:
    """onnxruntime shape -> list with ints for fixed axes and None for symbolic ones."""
    return [d if isinstance(d, int) else None for d in shape]


def _shape_mismatch(want: list, got: list) -> bool:
    return len(want) != len(got) or any(w is not None and g is not None and w != g for w, g in zip(want, got))


def _fmt(shape: list) -> str:
    return "[" + ", ".join("batch" if d is None else str(d) for d in shape) + "]"


def check_policy_graph(spec: ModelSpec, session) -> list[str]:
    """Compare policy.onnx's inputs and outputs with model.yaml; returns the output names in order."""
    f = spec.policy_file
    inputs = {i.name: _dims(i.shape) for i in session.get_inputs()}
    outputs = {o.name: _dims(o.shape) for o in session.get_outputs()}
    C, L, WA = spec.n_codes, spec.n_layers, spec.action_chunk * spec.action_dim
    want_in = {"obs": [None, spec.obs_window, spec.obs_dim]}
    if spec.goal_dim:
        want_in["goal"] = [None, spec.goal_dim]
    want_out = {"logits": [None, L, C], "offsets": [None, L, C, WA]}
    if spec.sequential:
        want_out["secondary_given_primary"] = [None, C, C]
    if spec.completion_horizon:
        want_out["completion"] = [None]
    for kind, want, got in (("input", want_in, inputs), ("output", want_out, outputs)):
        if set(want) != set(got):
            raise ModelFolderError(f"{f}: graph {kind}s are {sorted(got)} but model.yaml implies {sorted(want)}")
        for name, shape in want.items():
            if _shape_mismatch(shape, got[name]):
                raise ModelFolderError(f"{f}: {kind} '{name}' has shape {_fmt(got[name])} but model.yaml implies {_fmt(shape)}")
    return [o.name for o in session.get_outputs()]


def check_encoder_graph(spec: ModelSpec, session) -> None:
    f = spec.encoder_file
    ins, outs = session.get_inputs(), session.get_outputs()
    if len(ins) != 1 or len(outs) != 1:
        raise ModelFolderError(f"{f}: expected one input (image) and one output (features), got {len(ins)} and {len(outs)}")
    for key, pre in spec.preprocess.items():
        want = [None, 3, pre.size[1], pre.size[0]]
        if _shape_mismatch(want, _dims(ins[0].shape)):
            raise ModelFolderError(f"{f}: input has shape {_fmt(_dims(ins[0].shape))} but images.{key} implies {_fmt(want)}")
    if _shape_mismatch([None, spec.feature_dim], _dims(outs[0].shape)):
        raise ModelFolderError(f"{f}: output has shape {_fmt(_dims(outs[0].shape))} but image_feature_dim is {spec.feature_dim}")
