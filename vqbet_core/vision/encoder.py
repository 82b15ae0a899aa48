"""The image encoder: torchvision ResNet-18 without its classifier -> 512-d global-average-pooled feature.

Why frozen by default: VQ-BeT's image tasks use a pretrained, frozen ResNet-18; a frozen encoder lets
training encode every dataset frame once (``vqbet_core.vision.feature_cache``) and lets the runtime
encode each camera frame once, when it arrives. BatchNorm running statistics never change (not even
in fine-tuning mode), because small batches of highly correlated robot frames wreck ImageNet
statistics; in fine-tuning mode only the weights (conv, BN affine) train.

Weights (``vision.weights``): ``imagenet`` (torchvision's weights API: downloads into the torch hub
cache, or uses a file already there), ``none`` (random init from a fixed seed, so every process
builds the same encoder), or a local ``.safetensors`` / ``.pth`` / ``.pt`` state dict. Checkpoints and
exported models carry the exact weights used, written by :func:`save_encoder_weights`.

Input: the float32 NCHW tensor from ``ImagePreprocess.to_model_input``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vqbet_core.errors import VqbetError
from vqbet_core.vision.preprocess import ImagePreprocess

ARCH = "resnet18"
FEATURE_DIM = 512
NONE_SEED = 0  # seed of the random init for ``weights: none``
_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class ImageEncoder(nn.Module):
    """ResNet-18 trunk + global average pool: ``(B, 3, H, W)`` float32 -> ``(B, 512)``.

    Parameter names are torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) minus
    ``fc.*``, so torchvision / ImageNet state dicts load directly.
    """

    def __init__(self, finetune: bool = False, seed: int = NONE_SEED):
        super().__init__()
        from torchvision.models import resnet18

        with torch.random.fork_rng(devices=[]):  # fixed init without touching the caller's RNG
            torch.manual_seed(seed)
            net = resnet18(weights=None)
        for name in _TRUNK:
            setattr(self, name, getattr(net, name))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.finetune = bool(finetune)
        self.set_finetune(self.finetune)

    def set_finetune(self, finetune: bool) -> "ImageEncoder":
        """Frozen (default): no gradients, always eval mode. Fine-tune: weights train, BN stats stay fixed."""
        self.finetune = bool(finetune)
        for p in self.parameters():
            p.requires_grad_(self.finetune)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(bool(mode) and self.finetune)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # running statistics are never updated
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != 3):
            raise VqbetError(f"image encoder input must be (batch, 3, height, width) float32, got {tuple(x.shape)}")
        for name in _TRUNK:
            x = getattr(self, name)(x)
        return torch.flatten(self.pool(x), 1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self) -> str:
        """sha256 over every weight and buffer: identifies the exact encoder (feature cache, model.yaml)."""
        h = hashlib.sha256(ARCH.encode())
        for name, t in sorted(self.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def encode(self, images: np.ndarray, preprocess: ImagePreprocess, batch_size: int = 64, progress: str | None = None) -> np.ndarray:
        """Crop-resized RGB uint8 frames ``(N, H, W, 3)`` (array or zarr array) -> features ``(N, 512)`` float32.

        ``progress`` is a tqdm description, or None for no progress bar.
        """
        n = len(images)
        out = np.empty((n, FEATURE_DIM), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            starts = range(0, n, batch_size)
            if progress:
                from tqdm import tqdm

                starts = tqdm(starts, desc=progress, unit="batch", leave=False)
            for s in starts:
                x = torch.from_numpy(preprocess.to_model_input(np.asarray(images[s : s + batch_size])))
                out[s : s + len(x)] = self(x.to(self.device)).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out


# ---------------------------------------------------------------------- config and weights
def image_size_wh(value) -> tuple[int, int]:
    """``vision.image_size``: an int (square) or ``[width, height]`` -> ``(width, height)``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, np.integer)) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise VqbetError(f"vision.image_size must be a positive int or [width, height], got {value!r}")


def check_vision_config(vision_cfg: dict) -> dict:
    """Validate ``vision.*`` and fill defaults; returns a plain dict."""
    cfg = {"weights": "none", "image_size": 96, "feature_dim": FEATURE_DIM, "finetune": False, **dict(vision_cfg or {})}
    if not isinstance(cfg["weights"], (str, Path)) or not str(cfg["weights"]):
        raise VqbetError(f"vision.weights must be 'imagenet', 'none' or a weights file path, got {cfg['weights']!r}")
    if cfg["feature_dim"] != FEATURE_DIM:
        raise VqbetError(f"vision.feature_dim must be {FEATURE_DIM} for ResNet-18, got {cfg['feature_dim']!r}")
    if not isinstance(cfg["finetune"], bool):
        raise VqbetError(f"vision.finetune must be true or false, got {cfg['finetune']!r}")
    image_size_wh(cfg["image_size"])
    return cfg


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A local state dict: ``.safetensors``, or ``.pth`` / ``.pt`` read with ``torch.load(weights_only=True)``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise VqbetError(f"vision.weights: file not found: {path} (expected 'imagenet', 'none' or a .safetensors/.pth file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif path.suffix in (".pth", ".pt", ".bin"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise VqbetError(f"vision.weights: {path} must end in .safetensors, .pth or .pt")
    except VqbetError:
        raise
    except Exception as exc:
        raise VqbetError(f"vision.weights: cannot read {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VqbetError(f"vision.weights: {path} does not hold a state dict of tensors")
    return state


def load_encoder_state(encoder: ImageEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a ResNet-18 state dict (``fc.*`` and a ``module.`` prefix ignored); every trunk tensor must match."""
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise VqbetError(f"vision.weights: {source} is not a ResNet-18 state dict ({detail}, {len(missing)} missing, {len(unexpected)} unexpected keys)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise VqbetError(f"vision.weights: {source}: {k} has shape {tuple(v.shape)}, ResNet-18 expects {tuple(own[k].shape)}")
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _imagenet_state() -> dict[str, torch.Tensor]:
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise VqbetError(
            f"vision.weights=imagenet: cannot get {weights.url} ({type(exc).__name__}: {exc}); "
            f"copy that file into {hub}/ or set vision.weights to a local .safetensors/.pth file"
        ) from None


def build_encoder(vision_cfg: dict) -> ImageEncoder:
    """The encoder ``vision_cfg`` describes (weights, finetune), on the CPU; frozen unless ``finetune``."""
    cfg = check_vision_config(vision_cfg)
    encoder = ImageEncoder(finetune=cfg["finetune"])
    weights = str(cfg["weights"])
    if weights == "imagenet":
        load_encoder_state(encoder, _imagenet_state(), "ImageNet ResNet18_Weights.IMAGENET1K_V1")
    elif weights != "none":
        load_encoder_state(encoder, load_weights_file(weights), weights)
    return encoder.train(False)


def save_encoder_weights(encoder: ImageEncoder, path: str | Path) -> str:
    """Write the exact encoder weights (incl. BN statistics) as safetensors; returns the fingerprint."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    fingerprint = encoder.fingerprint()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"arch": ARCH, "feature_dim": str(FEATURE_DIM), "fingerprint": fingerprint})
    return fingerprint


# ---------------------------------------------------------------------- ONNX
def export_encoder_onnx(encoder: ImageEncoder, image_size, path: str | Path, opset: int = 17) -> float:
    """Export to ONNX (legacy exporter, dynamic batch ``image`` -> ``features``); returns onnxruntime max abs error.

    The check runs a batch of 3 normalized random frames (a batch size other than the export's) through
    torch and onnxruntime.
    """
    import onnxruntime as ort

    w, h = image_size_wh(image_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = encoder.training
    encoder.eval()
    device = encoder.device
    try:
        dummy = torch.zeros(2, 3, h, w, device=device)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is chosen on purpose
            torch.onnx.export(
                encoder, (dummy,), str(path), dynamo=False, opset_version=opset,
                input_names=["image"], output_names=["features"],
                dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
            )
        frames = np.random.default_rng(0).integers(0, 256, size=(3, h, w, 3), dtype=np.uint8)
        x = ImagePreprocess(size=(w, h)).to_model_input(frames)
        with torch.no_grad():
            expected = encoder(torch.from_numpy(x).to(device)).cpu().numpy()
    finally:
        encoder.train(was_training)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["features"], {"image": x})[0]
    return float(np.max(np.abs(got - expected)))


# ---------------------------------------------------------------------- benchmark
def _interleaved_times(fns: dict, min_calls: int = 5, min_seconds: float = 1.0) -> dict[str, np.ndarray]:
    """Per-call seconds of each function, calls alternating so a busy machine slows all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    start = time.perf_counter()
    while len(next(iter(times.values()))) < min_calls or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: np.asarray(v) for name, v in times.items()}


def bench_encoder(sizes=(96, 224), batches=(1, 64), threads: int = 2, min_seconds: float = 1.0) -> dict:
    """ResNet-18 forward time per frame, torch eager vs onnxruntime (CPU, ``threads`` threads).

    Reports the median and the minimum over calls (the minimum is the figure least disturbed by
    other processes on a shared machine) and the torch / onnxruntime ratio of the medians.
    """
    import tempfile

    import onnxruntime as ort

    torch.set_num_threads(threads)
    encoder = build_encoder({"weights": "none"})
    result = {"bench": "resnet18_encoder", "threads": threads, "torch": torch.__version__, "onnxruntime": ort.__version__,
              "load_avg_1min": round(os.getloadavg()[0], 2), "ms_per_frame": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            onnx_path = Path(tmp) / f"encoder_{size}.onnx"
            err = export_encoder_onnx(encoder, size, onnx_path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
            result[f"onnx_max_abs_error_{size}"] = err
            for batch in batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    times = _interleaved_times({"torch": lambda: encoder(xt),
                                                "onnxruntime": lambda: session.run(["features"], {"image": x})},
                                               min_seconds=min_seconds)
                entry = {}
                for name, t in times.items():
                    entry[name] = round(1e3 * float(np.median(t)) / batch, 3)
                    entry[f"{name}_min"] = round(1e3 * float(t.min()) / batch, 3)
                entry["calls"] = len(times["torch"])
                entry["torch_over_ort"] = round(float(np.median(times["torch"]) / np.median(times["onnxruntime"])), 2)
                result["ms_per_frame"][f"{size}px_batch{batch}"] = entry
    result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vqbet_core.vision.encoder", description="ResNet-18 encoder tools.")
    parser.add_argument("--bench", action="store_true", help="time torch vs onnxruntime forward; prints one JSON line")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time spent per measurement")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 1
    print(json.dumps(bench_encoder(tuple(args.sizes), tuple(args.batches), args.threads, args.min_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
