"""onnxruntime sessions set up for a control loop: providers and their options, threads, warm-up, IO binding.

Why a module of its own: the policy step runs two small graphs (encoder, policy) once per control period at
batch 1, and what an arm feels is the worst step, not the mean. So everything about *how* a graph runs sits
here, chosen by measurement (``vqbet bench policy --session-variants``, docs/explanation/benchmarks.md):

- providers: TensorRT > CUDA > CPU, those this onnxruntime build has (``onnxruntime-gpu`` has all three);
  TensorRT builds fp16 engines and caches them (and its timing cache) in a folder keyed by the graph's hash,
  so only the very first start on a machine pays the engine build;
- threads: ``intra_op_num_threads`` as asked, one inter-op thread, sequential execution;
- spinning: whether idle intra-op workers busy-wait for the next operator (lower latency when the cores are
  free; on a robot computer shared with drivers it steals their CPU and the waits show up in the p99);
- warm-up at load: a few runs on zero inputs, so the first control step is not the one that allocates the
  arena, picks convolution algorithms or builds a TensorRT engine;
- IO binding: inputs copied into buffers bound once, outputs written into preallocated buffers (on a GPU
  this also keeps onnxruntime from allocating device memory every step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqbet_core.errors import ModelFolderError, VqbetError
from vqbet_core.runtime.spec import sha256_file

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class SessionSettings:
    """How the runtime's graphs run. Defaults: the measured choice on a 2-core CPU (benchmarks.md)."""

    threads: int | None = None  # intra-op threads; None = onnxruntime's default (one per core)
    spin: bool = False  # idle intra-op workers busy-wait (onnxruntime's default is True)
    io_binding: bool | None = None  # None = on with a GPU provider, off on the CPU
    warmup: int = 2  # runs on zero inputs at load
    fp16: bool = True  # TensorRT: build fp16 engines
    cache_dir: str | None = None  # TensorRT engine / timing cache; None = $VQBET_CACHE/tensorrt or ~/.cache/vqbet/tensorrt

    def __post_init__(self):
        if self.threads is not None and int(self.threads) < 1:
            raise VqbetError(f"threads {self.threads}: expected >= 1 (or None for onnxruntime's default)")
        if int(self.warmup) < 0:
            raise VqbetError(f"warmup {self.warmup}: expected >= 0 runs")


def import_onnxruntime():
    """onnxruntime, or one line saying which of the two builds to install."""
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise VqbetError("onnxruntime is not installed: pip install -e '.[cpu]' (CPU) or -e '.[gpu]' "
                         "(onnxruntime-gpu: TensorRT / CUDA / CPU), never both") from None
    return onnxruntime


def resolve_providers(providers: list[str] | None = None) -> list[str]:
    """``None``: TensorRT > CUDA > CPU, those this onnxruntime build has. Otherwise checked as given."""
    ort = import_onnxruntime()

    available = ort.get_available_providers()
    if providers is None:
        return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]
    providers = [providers] if isinstance(providers, str) else list(providers)
    missing = [p for p in providers if p not in available]
    if missing or not providers:
        raise VqbetError(f"onnxruntime providers {missing or providers} are not available (this build has: {', '.join(available)})")
    return providers


def engine_cache_dir(graph: Path, settings: SessionSettings) -> Path:
    """Where TensorRT keeps the engines of ``graph``: one folder per graph content (a new export, a new engine)."""
    root = settings.cache_dir or os.environ.get("VQBET_CACHE") and str(Path(os.environ["VQBET_CACHE"]) / "tensorrt")
    root = Path(root) if root else Path.home() / ".cache" / "vqbet" / "tensorrt"
    return root / f"{graph.stem}-{sha256_file(graph)[:16]}{'-fp16' if settings.fp16 else ''}"


def provider_options(providers: list[str], graph: Path, settings: SessionSettings) -> list[dict]:
    """Per-provider options, in the order of ``providers`` (onnxruntime's ``provider_options``)."""
    out = []
    for name in providers:
        if name == "TensorrtExecutionProvider":
            cache = engine_cache_dir(graph, settings)
            out.append({"trt_fp16_enable": bool(settings.fp16), "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": str(cache), "trt_builder_optimization_level": 3})
        elif name == "CUDAExecutionProvider":
            # the convolution search runs once (at warm-up); copies on the default stream keep IO binding ordered
            out.append({"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True})
        else:
            out.append({})
    return out


def session_options(settings: SessionSettings):
    ort = import_onnxruntime()

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # provider fall-back chatter only at error level
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if settings.threads:
        opts.intra_op_num_threads = int(settings.threads)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spin else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if settings.spin else "0")
    return opts


def open_session(path: Path, providers: list[str], settings: SessionSettings | None = None):
    """An ``InferenceSession``; a corrupt or unreadable file becomes one ``ModelFolderError`` line."""
    ort = import_onnxruntime()

    settings = settings or SessionSettings()
    path = Path(path)
    try:
        options = provider_options(providers, path, settings)
        for name, opt in zip(providers, options):
            if name == "TensorrtExecutionProvider":
                Path(opt["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        return ort.InferenceSession(str(path), session_options(settings), providers=list(zip(providers, options)))
    except OSError as exc:
        raise ModelFolderError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelFolderError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {first[:200]})") from None


class GraphRunner:
    """One graph of the model: ``run(feed)`` -> the outputs, as numpy arrays the caller owns.

    ``example``: zero inputs of the shapes the runtime will feed (batch of one step), used for the warm-up
    and to size the bound buffers. A feed of another shape runs unbound (still correct, just not preallocated).
    """

    def __init__(self, path: Path, providers: list[str], outputs: list[str], settings: SessionSettings | None = None):
        self.settings = settings or SessionSettings()
        self.path = Path(path)
        self.session = open_session(self.path, providers, self.settings)
        self.outputs = list(outputs)
        self.providers = list(self.session.get_providers())  # what onnxruntime actually registered
        self.on_gpu = any(p in GPU_PROVIDERS for p in self.providers)
        self._binding = None

    def prepare(self, example: dict[str, np.ndarray]) -> None:
        """Warm up on ``example`` and, when IO binding is on, bind buffers of its shapes."""
        for _ in range(int(self.settings.warmup)):
            self.session.run(self.outputs, example)
        use = self.settings.io_binding if self.settings.io_binding is not None else self.on_gpu
        if use:
            self._binding = _Binding(self.session, self.outputs, example, "cuda" if self.on_gpu else "cpu")
            for _ in range(min(1, int(self.settings.warmup))):
                self._binding.run(example)

    @property
    def bound(self) -> bool:
        return self._binding is not None

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._binding is not None and self._binding.fits(feed):
            return self._binding.run(feed)
        return self.session.run(self.outputs, feed)


class _Binding:
    """Inputs and outputs bound once: each run copies the inputs into their buffers, no allocation per step."""

    def __init__(self, session, outputs: list[str], example: dict[str, np.ndarray], device: str):
        import onnxruntime as ort

        self.session = session
        first = session.run(outputs, example)
        self.io = session.io_binding()
        self.shapes = {k: (np.asarray(v).shape, np.asarray(v).dtype) for k, v in example.items()}
        self.inputs = {}
        for k, v in example.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, 0)
            self.inputs[k] = value
            self.io.bind_ortvalue_input(k, value)
        # outputs land in host buffers we own (small: features, logits, offsets): one copy out per run
        self.out_arrays = [np.empty_like(o) for o in first]
        self.out_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.out_arrays]
        for name, value in zip(outputs, self.out_values):
            self.io.bind_ortvalue_output(name, value)

    def fits(self, feed: dict[str, np.ndarray]) -> bool:
        return feed.keys() == self.shapes.keys() and all(
            np.shape(v) == self.shapes[k][0] and np.asarray(v).dtype == self.shapes[k][1] for k, v in feed.items())

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        for k, v in feed.items():
            self.inputs[k].update_inplace(np.ascontiguousarray(v))
        self.session.run_with_iobinding(self.io)
        return [a.copy() for a in self.out_arrays]
