"""int8 encoder: calibrated on the training frames, judged on held-out ones, refused when decisions change."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from vqbet_core.cli.main import main as vqbet
from vqbet_core.export.onnx_export import export_model
from vqbet_core.runtime.policy import PolicyRuntime

from tests.unit.test_export_runtime import image_goal_dataset, tiny_cfg, train


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    work = tmp_path_factory.mktemp("quantize")
    data = image_goal_dataset(work / "images.zarr", episodes=8, length=10)
    run = train(tiny_cfg("vqbet", image_keys=["camera_front"], goal_key="goal"), data, work / "run")
    model = work / "model"
    export_model(run, model, parity_steps=4)
    return data, model


def test_int8_encoder_is_written_checked_and_used(image_model, capsys):
    data, model = image_model
    assert vqbet(["quantize", str(model), "--data", str(data), "--frames", "32", "--holdout", "16",
                  "--min-agreement", "0.5", "--min-cosine", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    parity = report["parity"]
    assert 0.5 <= parity["code_agreement"] <= 1.0 and 0.5 <= parity["feature_cosine_min"] < 1.0
    assert 0 <= parity["primary_distribution_tv_mean"] <= parity["primary_distribution_tv_max"] <= 1
    flips = round((1 - parity["code_agreement"]) * 16)
    assert len(parity["flipped_fp32_top2_gaps"]) == flips and all(0 <= g <= 1 for g in parity["flipped_fp32_top2_gaps"])
    meta = yaml.safe_load((model / "model.yaml").read_text())
    assert meta["encoder_precision"] == "int8" and meta["files"]["encoder_int8"]["calibration"]["frames"] == 32
    assert (model / "encoder.onnx").is_file()  # the fp32 graph stays
    rt = PolicyRuntime(model)
    assert rt.precision == "int8"
    import onnx

    ops = {n.op_type for n in onnx.load(str(model / "encoder_int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert PolicyRuntime(model, precision="fp32").precision == "fp32"
    from vqbet_core.runtime.agent import RuntimeAgent

    assert RuntimeAgent(model, precision="fp32").runtime.precision == "fp32"  # what vqbet eval --precision uses
    rt.reset(rt.spec.goal_names[0])
    rt.observe({"state": np.zeros(2, np.float32)}, {"camera_front": np.zeros((32, 32, 3), np.uint8)})
    assert np.isfinite(rt.predict().actions).all()


def test_a_changed_int8_file_is_refused_at_load(image_model, tmp_path):
    import shutil

    data, model = image_model
    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    if not (copy / "encoder_int8.onnx").exists():
        pytest.skip("needs the int8 encoder of the test above")
    with open(copy / "encoder_int8.onnx", "ab") as f:
        f.write(b"x")
    from vqbet_core.errors import ModelFolderError

    with pytest.raises(ModelFolderError, match="encoder_int8.onnx: file changed since export"):
        PolicyRuntime(copy)


def test_refused_below_the_thresholds_and_the_folder_is_unchanged(image_model, tmp_path, capsys):
    import shutil

    data, model = image_model
    fresh = tmp_path / "fresh"
    shutil.copytree(model, fresh)
    (fresh / "encoder_int8.onnx").unlink(missing_ok=True)
    meta = yaml.safe_load((fresh / "model.yaml").read_text())
    meta.pop("encoder_precision", None)
    meta["files"].pop("encoder_int8", None)
    (fresh / "model.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    before = (fresh / "model.yaml").read_text()
    # int8 features are never exactly the fp32 ones: a cosine of 1.0 cannot be met
    assert vqbet(["quantize", str(fresh), "--data", str(data), "--frames", "16", "--holdout", "8",
                  "--min-cosine", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "int8 encoder refused" in err and err.count("\n") == 1
    assert (fresh / "model.yaml").read_text() == before and not (fresh / "encoder_int8.onnx").exists()
    assert PolicyRuntime(fresh).precision == "fp32"
    from vqbet_core.errors import VqbetError

    with pytest.raises(VqbetError, match="has no int8 encoder"):
        PolicyRuntime(fresh, precision="int8")


def test_a_state_model_has_nothing_to_quantize(tmp_path, capsys):
    data = tmp_path / "mp.zarr"
    assert vqbet(["sim-demos", "--env", "multipath", "--episodes", "4", "--out", str(data), "--no-progress"]) == 0
    export_model(train(tiny_cfg("vqbet"), data, tmp_path / "run"), tmp_path / "state_model", parity_steps=2)
    capsys.readouterr()
    assert vqbet(["quantize", str(tmp_path / "state_model"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "has no image encoder" in err and err.count("\n") == 1


def test_bench_policy_puts_int8_beside_fp32(image_model, capsys):
    from vqbet_core.runtime import bench

    data, model = image_model
    assert bench.main(["--model", str(model), "--steps", "4", "--warmup", "1", "--threads", "1", "--sizes", "32",
                       "--no-torch", "--int8-data", str(data)]) == 0
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]["32x32"]
    assert {"p50", "p99", "max"} <= set(entry["runtime_int8_ms"]["encoder"])
    assert entry["int8_encoder_speedup"] > 0 and 0 <= entry["int8_parity"]["code_agreement"] <= 1


def test_other_calibration_methods_and_fp32_ends(image_model, tmp_path, capsys):
    import shutil

    data, model = image_model
    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    assert vqbet(["quantize", str(copy), "--data", str(data), "--frames", "16", "--holdout", "8", "--method", "percentile",
                  "--keep-ends-fp32", "--min-agreement", "0", "--min-cosine", "0"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "percentile" in report["calibration"]["method"] and "fp32 kept for" in report["calibration"]["method"]
    import onnx

    graph = onnx.load(str(copy / "encoder_int8.onnx")).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # the first convolution reads the fp32 image directly (no DequantizeLinear in front of its input)
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert producers.get(convs[0].input[0]) != "DequantizeLinear"
    assert any(producers.get(c.input[0]) == "DequantizeLinear" for c in convs[1:-1])


def test_bench_policy_session_settings_variants_and_plot(image_model, tmp_path, capsys):
    from vqbet_core.errors import VqbetError
    from vqbet_core.runtime import bench

    data, model = image_model
    png = tmp_path / "latency.png"
    assert bench.main(["--model", str(model), "--steps", "6", "--warmup", "1", "--threads", "1", "--sizes", "32",
                       "--no-torch", "--session", "spin=1", "--session-variants", "io_binding=1", "spin=0,threads=1",
                       "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["session"]["spin"] is True and png.stat().st_size > 1000
    entry = out["results"]["32x32"]
    assert set(entry["variants"]) == {"io_binding=1", "spin=0,threads=1"}
    for v in entry["variants"].values():
        assert v["jitter_p99_over_p50"] >= 1.0 and v["step"]["p50"] > 0
    assert entry["providers"] == {"policy": ["CPUExecutionProvider"], "encoder": ["CPUExecutionProvider"]}
    with pytest.raises(VqbetError, match="KEY=VALUE"):
        bench.parse_variant("spinning=1", 1)
    with pytest.raises(VqbetError, match="needs an integer"):
        bench.parse_variant("spin=yes", 1)
