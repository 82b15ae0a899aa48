"""Static int8 quantization of an exported model's image encoder, judged by the decisions it changes.

Why: on a robot computer without a GPU the ResNet-18 encoder is 80-90 % of a control step; int8 convolutions
run it several times faster. Why judged by decisions: a small feature error matters only if it changes
which action code the policy picks, so the check is the fraction of held-out frames (from the training
dataset, never used for calibration) where the argmax codes with the int8 encoder equal the fp32 ones,
with the feature cosine and the action error beside it. Below the thresholds the int8 graph is refused
(one line) and the model folder is left as it was.

Method: onnxruntime's static quantization (``quant_pre_process`` then ``quantize_static``, QDQ format,
per-channel int8 weights, uint8 activations, MinMax calibration) on frames of the training dataset,
preprocessed exactly as the runtime does. The fp32 ``encoder.onnx`` stays; ``model.yaml`` gets
``files.encoder_int8`` (file, sha256, calibration, parity) and ``encoder_precision: int8`` (what
:class:`vqbet_core.runtime.PolicyRuntime` loads unless told otherwise).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import yaml

from vqbet_core.errors import VqbetError
from vqbet_core.runtime.spec import MODEL_YAML, load_spec, sha256_file

ENCODER_INT8_ONNX = "encoder_int8.onnx"


def _frames(ds, spec, key: str, steps: np.ndarray) -> np.ndarray:
    """Model inputs ``(N, 3, H, W)`` of camera ``key`` at dataset ``steps``, preprocessed as the runtime does."""
    pre = spec.preprocess[key]
    arr = ds.array(key)
    return np.concatenate([pre.to_model_input(pre.crop_resize(np.asarray(arr[int(i)]))[None]) for i in steps])


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed frames (one per call)."""

    def __init__(self, input_name: str, frames: np.ndarray):
        self.input_name, self.frames, self.i = input_name, frames, 0

    def get_next(self):
        if self.i >= len(self.frames):
            return None
        self.i += 1
        return {self.input_name: self.frames[self.i - 1 : self.i]}

    def rewind(self):
        self.i = 0


METHODS = ("minmax", "percentile", "entropy")


def _graph_ends(path: Path) -> list[str]:
    """Names of the first and the last convolution: the layers int8 hurts most (raw pixels in, the features out)."""
    import onnx

    convs = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "Conv"]
    return [convs[0], convs[-1]] if len(convs) > 1 else convs


def quantize_encoder(model_dir: str | Path, data_path: str | Path, frames: int = 200, holdout: int = 300,
                     min_agreement: float = 0.99, min_cosine: float = 0.98, seed: int = 0, method: str = "minmax",
                     keep_ends_fp32: bool = False) -> dict:
    """Write ``encoder_int8.onnx`` into ``model_dir`` if it keeps the policy's decisions; returns the report.

    ``method``: activation calibration (minmax | percentile | entropy: onnxruntime's calibrators);
    ``keep_ends_fp32``: leave the first and the last convolution in fp32."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    from vqbet_core.data.store import ZarrDataset
    from vqbet_core.runtime.policy import PolicyRuntime

    model_dir = Path(model_dir)
    spec = load_spec(model_dir)
    if not spec.image_keys:
        raise VqbetError(f"{model_dir}: a state-only model has no image encoder to quantize")
    if frames < 8 or holdout < 8:
        raise VqbetError(f"--frames {frames} / --holdout {holdout}: expected at least 8 calibration and 8 held-out frames")
    for name, value in (("min_agreement", min_agreement), ("min_cosine", min_cosine)):
        if not 0.0 <= value <= 1.0:
            raise VqbetError(f"--{name.replace('_', '-')} {value}: expected a fraction in [0, 1]")
    if method not in METHODS:
        raise VqbetError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    ds = ZarrDataset.open(data_path, "r")
    ds.validate(spec.image_keys + spec.obs_keys)
    if ds.n_steps < frames + holdout:
        raise VqbetError(f"{data_path}: {ds.n_steps} steps, fewer than --frames {frames} + --holdout {holdout}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(ds.n_steps, frames + holdout, replace=False)
    calib, held = np.sort(chosen[:frames]), np.sort(chosen[frames:])

    src = model_dir / spec.meta["files"]["encoder"]["file"]
    out = model_dir / ENCODER_INT8_ONNX
    input_name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    calib_frames = np.concatenate([_frames(ds, spec, key, calib) for key in spec.image_keys])
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "encoder_prepped.onnx"
        quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
        calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                     "entropy": CalibrationMethod.Entropy}[method]
        excluded = _graph_ends(prepped) if keep_ends_fp32 else []
        quantize_static(str(prepped), str(out), _Reader(input_name, calib_frames), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calibrate, nodes_to_exclude=excluded)
    yaml_path = model_dir / MODEL_YAML
    before = yaml_path.read_text()
    meta = yaml.safe_load(before)
    meta["files"]["encoder_int8"] = {"file": ENCODER_INT8_ONNX, "sha256": sha256_file(out)}
    yaml_path.write_text(yaml.safe_dump(meta, sort_keys=False))  # registered for the check; undone on refusal
    try:
        parity = _decision_parity(model_dir, spec, ds, held, PolicyRuntime)
        refused = parity["code_agreement"] < min_agreement or parity["feature_cosine_min"] < min_cosine
    except BaseException:
        yaml_path.write_text(before)
        out.unlink(missing_ok=True)
        raise
    report = {"calibration": {"dataset": str(Path(data_path).resolve()), "frames": int(frames),
                              "cameras": list(spec.image_keys), "seed": int(seed),
                              "method": f"onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, {method}"
                                        + (f", fp32 kept for {', '.join(excluded)}" if excluded else "")},
              "parity": {**parity, "heldout_frames": int(holdout), "min_agreement": min_agreement, "min_cosine": min_cosine}}
    if refused:
        yaml_path.write_text(before)
        out.unlink(missing_ok=True)
        raise VqbetError(f"int8 encoder refused: argmax codes agree with fp32 on {parity['code_agreement']:.3f} of "
                         f"{holdout} held-out frames (need {min_agreement}), feature cosine min "
                         f"{parity['feature_cosine_min']:.4f} (need {min_cosine}); {model_dir} is unchanged")
    meta["files"]["encoder_int8"].update(report)
    meta["encoder_precision"] = "int8"
    yaml_path.write_text(yaml.safe_dump(meta, sort_keys=False))
    return {"model": str(model_dir), "file": ENCODER_INT8_ONNX, **report}


def _goal_at(spec, ds, goal_key: str | None):
    """The goal the demonstration had at each step (named goals by task index, else the raw vector), or None."""
    if not spec.goal_dim:
        return lambda i: None
    if goal_key and goal_key in ds.keys:
        arr = ds.array(goal_key)
        names = list(ds.attrs.get("task_names") or [])
        if names and all(n in spec.goal_vectors for n in names):
            return lambda i: names[int(np.asarray(arr[int(i)]).reshape(-1)[0])]
        return lambda i: np.asarray(arr[int(i)], np.float32).reshape(-1)
    first = spec.goal_names[0] if spec.goal_names else np.zeros(spec.goal_dim, np.float32)
    return lambda i: first


def _softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(z, np.float64) / max(temperature, 1e-6)
    e = np.exp(z - z.max())
    return e / e.sum()


def _decision_parity(model_dir: Path, spec, ds, held: np.ndarray, runtime_cls) -> dict:
    """fp32 vs int8 on held-out steps, each with the goal its demonstration had: argmax codes, the code
    primary-code distributions the sampler draws from (total variation at the model's temperature), how clear
    each flipped decision was (fp32's top-two probability gap at the first layer that differs), feature cosine,
    action error with the same codes."""
    rts = {p: runtime_cls(model_dir, providers=["CPUExecutionProvider"], temperature=0.0, precision=p)
           for p in ("fp32", "int8")}
    goal_at = _goal_at(spec, ds, spec.meta.get("goal_key"))
    starts = np.concatenate([[0], ds.episode_ends[:-1]])
    lowdim = {k: ds.array(k) for k in spec.obs_keys}
    images = {k: ds.array(k) for k in spec.image_keys}
    agree, cosines, act_err, tvs, flip_gaps = 0, [], 0.0, [], []
    temp = spec.temperature if spec.temperature > 0 else 1.0
    for i in held:
        first = int(max(starts[np.searchsorted(ds.episode_ends, i, side="right")], i - spec.obs_window + 1))
        heads = {}
        for p, rt in rts.items():
            rt.reset(goal_at(i))
            for j in range(first, int(i) + 1):
                rt.observe({k: np.asarray(v[j]) for k, v in lowdim.items()}, {k: np.asarray(v[j]) for k, v in images.items()},
                           stamp=j * spec.period)
            heads[p] = rt.heads()
        codes = rts["fp32"].choose_codes(heads["fp32"])
        other = rts["int8"].choose_codes(heads["int8"])
        agree += int(np.array_equal(codes, other))
        p32, p8 = (_softmax(heads[p]["logits"][0][0], temp) for p in ("fp32", "int8"))
        tvs.append(0.5 * float(np.abs(p32 - p8).sum()))
        if not np.array_equal(codes, other):  # how clear fp32's choice was at the first layer that differs
            layer = int(np.argmax(codes != other))
            h = heads["fp32"]
            row = (h["secondary_given_primary"][0][codes[0]] if layer == 1 and spec.sequential and "secondary_given_primary" in h
                   else h["logits"][0][layer])
            top = np.sort(_softmax(row, temp))[::-1]
            flip_gaps.append(float(top[0] - top[1]))
        act_err = max(act_err, float(np.max(np.abs(rts["fp32"].decode(heads["fp32"], codes)
                                                   - rts["int8"].decode(heads["int8"], codes)))))
    for key in spec.image_keys:  # the encoders' own features on the held-out frames
        x = _frames(ds, spec, key, held)
        a, b = (rt.encoder_features(x) for rt in (rts["fp32"], rts["int8"]))
        cosines += ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).tolist()
    return {"code_agreement": agree / len(held), "feature_cosine_mean": float(np.mean(cosines)),
            "feature_cosine_min": float(np.min(cosines)), "action_max_abs_error": act_err,
            "primary_distribution_tv_mean": float(np.mean(tvs)), "primary_distribution_tv_max": float(np.max(tvs)),
            "flipped_fp32_top2_gaps": sorted(round(g, 4) for g in flip_gaps)}
