"""How the runtime's graphs run (vqbet_core.runtime.session): settings, provider options, warm-up, IO binding,
and the onnxruntime packaging (one build per environment, the same pin in the Docker image)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vqbet_core.errors import ModelFolderError, VqbetError
from vqbet_core.runtime.session import (GraphRunner, SessionSettings, engine_cache_dir, provider_options,
                                        session_options)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def affine_graph(tmp_path) -> Path:
    """y = x @ W + b, z = sum(x): a real ONNX file with two outputs and a fixed batch of one."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("ReduceSum", ["x"], ["z"], keepdims=0)],
        "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [])],
        [helper.make_tensor("W", TensorProto.FLOAT, [4, 3], w.ravel()),
         helper.make_tensor("b", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])])
    path = tmp_path / "affine.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def expected(x: np.ndarray) -> tuple[np.ndarray, float]:
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    return x @ w + np.array([1.0, 2.0, 3.0], np.float32), float(x.sum())


@pytest.mark.parametrize("io_binding", [False, True])
def test_graph_runner_bound_and_unbound_give_the_same_outputs_and_own_them(affine_graph, io_binding):
    runner = GraphRunner(affine_graph, ["CPUExecutionProvider"], ["y", "z"], SessionSettings(threads=1, io_binding=io_binding))
    runner.prepare({"x": np.zeros((1, 4), np.float32)})
    assert runner.bound is io_binding and runner.providers == ["CPUExecutionProvider"] and not runner.on_gpu
    rng = np.random.default_rng(0)
    kept = []
    for _ in range(5):
        x = rng.standard_normal((1, 4)).astype(np.float32)
        y, z = runner.run({"x": x})
        want_y, want_z = expected(x)
        np.testing.assert_allclose(y, want_y, rtol=1e-6)
        assert float(z) == pytest.approx(want_z, rel=1e-6)
        kept.append((x, y))
    for x, y in kept:  # earlier outputs are not overwritten by later runs (the bound buffers are copied out)
        np.testing.assert_allclose(y, expected(x)[0], rtol=1e-6)


def test_bound_runner_falls_back_for_another_shape_or_dtype(affine_graph, tmp_path):
    runner = GraphRunner(affine_graph, ["CPUExecutionProvider"], ["y", "z"], SessionSettings(io_binding=True, warmup=0))
    runner.prepare({"x": np.zeros((1, 4), np.float32)})
    assert runner.bound
    assert not runner._binding.fits({"x": np.zeros((1, 4), np.float64)})
    assert not runner._binding.fits({"x": np.zeros((2, 4), np.float32)})
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(runner.run({"x": x})[0], expected(x)[0], rtol=1e-6)


def test_session_options_carry_threads_and_spinning():
    opts = session_options(SessionSettings(threads=3, spin=True))
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    opts = session_options(SessionSettings())
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if SessionSettings.spin else "0")


def test_settings_reject_nonsense():
    with pytest.raises(VqbetError, match="threads 0"):
        SessionSettings(threads=0)
    with pytest.raises(VqbetError, match="warmup -1"):
        SessionSettings(warmup=-1)


def test_tensorrt_gets_fp16_and_an_engine_cache_per_graph_content(affine_graph, tmp_path, monkeypatch):
    monkeypatch.delenv("VQBET_CACHE", raising=False)
    settings = SessionSettings(cache_dir=str(tmp_path / "trt"))
    trt, cuda, cpu = provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                                      affine_graph, settings)
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    cache = Path(trt["trt_engine_cache_path"])
    assert cache.parent == tmp_path / "trt" and cache.name.startswith("affine-") and cache.name.endswith("-fp16")
    assert cuda["do_copy_in_default_stream"] is True and cpu == {}
    # another graph content -> another folder (a re-export never loads a stale engine); fp32 -> another folder
    other = tmp_path / "other" / "affine.onnx"
    other.parent.mkdir()
    other.write_bytes(affine_graph.read_bytes() + b" ")
    assert engine_cache_dir(other, settings) != cache
    assert engine_cache_dir(affine_graph, SessionSettings(cache_dir=str(tmp_path / "trt"), fp16=False)) != cache
    monkeypatch.setenv("VQBET_CACHE", str(tmp_path / "vc"))
    assert engine_cache_dir(affine_graph, SessionSettings()).parent == tmp_path / "vc" / "tensorrt"


def test_unreadable_graph_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFolderError) as exc:
        GraphRunner(bad, ["CPUExecutionProvider"], ["y"])
    assert "not a loadable ONNX model" in str(exc.value) and "\n" not in str(exc.value)


def test_onnxruntime_is_one_build_per_environment_with_one_pin():
    """The cpu and gpu extras pin the same onnxruntime version, the base dependencies name neither (installing
    both breaks the shared module), and the Docker image installs the gpu build at that pin."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if d.startswith("onnxruntime")]
    extras = meta["optional-dependencies"]
    (cpu,), (gpu,) = extras["cpu"], extras["gpu"]
    assert cpu.startswith("onnxruntime==") and gpu.startswith("onnxruntime-gpu==")
    version = cpu.split("==")[1]
    assert gpu.split("==")[1] == version
    docker = (REPO / "docker" / "Dockerfile").read_text()
    assert re.findall(r"onnxruntime(?:-gpu)?==[\d.]+", docker) == [f"onnxruntime-gpu=={version}"]
    assert "$(ORT)" in (REPO / "Makefile").read_text()
