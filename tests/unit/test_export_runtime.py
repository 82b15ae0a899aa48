"""Export -> onnxruntime runtime: parity with torch (VQ-BeT, BeT, image, goal-conditioned), the torch-free
runtime, seeded sampling, timestamps, ``vqbet eval --model`` and one-line errors for bad model folders."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from vqbet_core.cli.main import main as vqbet
from vqbet_core.config import load_config
from vqbet_core.data.store import ZarrDataset
from vqbet_core.errors import ModelFolderError, VqbetError
from vqbet_core.export.onnx_export import export_model
from vqbet_core.runtime import PolicyRuntime
from vqbet_core.runtime.agent import RuntimeAgent
from vqbet_core.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
IMG = 32  # tiny frames keep ResNet-18 cheap on 2 cores


def tiny_cfg(policy: str, **data) -> dict:
    return load_config("multipath", {
        "policy": policy, "obs_window": 3, "action_chunk": 3,
        "data": {"obs_keys": ["state"], **data}, "vision": {"image_size": IMG},
        "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "heads": {"hidden": 32},
        "vq": {"code_dim": 16, "hidden": 32, "n_codes": 4}, "bet": {"n_bins": 4},
        "train": {"phase1_steps": 10, "phase2_steps": 6, "batch_size": 32, "phase1_batch_size": 64, "log_every": 5,
                  "val_every": 6, "ckpt_every": 100, "device": "cpu"}})


def image_goal_dataset(path: Path, episodes: int = 6, length: int = 10) -> Path:
    """Point going up or down; the camera colour and the goal vector say which (joint names, 5 Hz, named goals)."""
    rng = np.random.default_rng(0)
    ds = ZarrDataset.create(path, {"source": "test-images", "control_hz": 5.0, "joint_names": ["joint_a", "joint_b"],
                                   "goal_vectors": {"up": [0.0, 1.0], "down": [0.0, -1.0]}})
    for e in range(episodes):
        up = e % 2 == 0
        pos, rows = np.zeros(2, np.float32), {"state": [], "action": [], "camera_front": [], "camera_wrist": [], "goal": []}
        for t in range(length):
            a = np.array([0.1, 0.0] if t < length // 2 else [0.0, 0.1 if up else -0.1], np.float32)
            img = np.full((IMG, IMG, 3), 40, np.uint8)
            img[:, :, 0 if up else 2] = 200
            rows["state"].append(pos.copy())
            rows["action"].append(a)
            rows["camera_front"].append(np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8))
            rows["camera_wrist"].append(np.roll(rows["camera_front"][-1], t, axis=1))
            rows["goal"].append([0.0, 1.0 if up else -1.0])
            pos = pos + a
        ds.add_episode({k: np.asarray(v, np.uint8 if k.startswith("camera_") else np.float32) for k, v in rows.items()})
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def multipath_data(work):
    out = work / "multipath.zarr"
    assert vqbet(["sim-demos", "--env", "multipath", "--episodes", "8", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def image_data(work):
    return image_goal_dataset(work / "images.zarr")


def train(cfg: dict, data: Path, run: Path) -> Path:
    Trainer(cfg, data, run, progress=False, cache_dir=run.parent / "cache").run()
    return run


@pytest.fixture(scope="module")
def models(work, multipath_data, image_data):
    """name -> (run dir, exported model dir, export report); each trained and exported once per module."""
    specs = {
        "vqbet": (tiny_cfg("vqbet"), multipath_data),
        "bet": (tiny_cfg("bet"), multipath_data),
        "image": (tiny_cfg("vqbet", image_keys=["camera_front", "camera_wrist"]), image_data),
        "goal": (tiny_cfg("bet", goal_key="goal"), image_data),
    }
    out = {}
    for name, (cfg, data) in specs.items():
        run = train(cfg, data, work / f"run_{name}")
        report = export_model(run, work / "models" / name, parity_steps=6)
        out[name] = (run, work / "models" / name, report)
    return out


def observations(n: int, seed: int = 0, image: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    obs = []
    for _ in range(n):
        o = {"state": (rng.standard_normal(2) + [2.0, 2.0]).astype(np.float32)}
        if image:
            o["camera_front"] = rng.integers(0, 256, size=(IMG, IMG, 3), dtype=np.uint8)
            o["camera_wrist"] = rng.integers(0, 256, size=(IMG, IMG, 3), dtype=np.uint8)
        obs.append(o)
    return obs


# ---------------------------------------------------------------------- export + parity
@pytest.mark.parametrize("name", ["vqbet", "bet", "image", "goal"])
def test_export_writes_checked_folder_with_parity(models, name):
    run, folder, report = models[name]
    files = {p.name for p in folder.iterdir()}
    want = {"policy.onnx", "model.yaml", "card.md", "arrays.npz"} | ({"encoder.onnx"} if name == "image" else set())
    assert files == want
    assert report["max_abs_error"] < 1e-4
    assert report["parity"]["argmax_codes_agree"] == "6/6"
    assert report["parity"]["batch3_logits_max_abs_error"] < 1e-4
    meta = yaml.safe_load((folder / "model.yaml").read_text())
    assert meta["kind"] == ("bet" if name in ("bet", "goal") else "vqbet")
    assert meta["obs_window"] == 3 and meta["action_chunk"] == 3 and meta["action_dim"] == 2
    assert meta["data_hash"] and meta["versions"]["onnxruntime"] and meta["export"]["parity"]["max_abs_error"] < 1e-4
    assert meta["codes"]["layers"] == (1 if meta["kind"] == "bet" else 2)
    if name == "image":
        assert meta["images"]["camera_wrist"]["size"] == [IMG, IMG] and meta["obs_dim"] == 2 + 2 * 512
        assert report["parity"]["encoder_max_abs_error"] < 1e-4
    if name in ("image", "goal"):
        assert meta["joint_names"] == ["joint_a", "joint_b"] and meta["control_hz"] == 5.0
    if name == "goal":
        assert meta["goal_dim"] == 2 and meta["goal_names"] == ["down", "up"]
    card = (folder / "card.md").read_text()
    assert "max abs action error" in card and str(run.resolve()) in card
    assert not list(folder.parent.glob(".*partial*"))  # no leftovers of the atomic write


@pytest.mark.parametrize("name", ["vqbet", "bet", "image", "goal"])
def test_runtime_agent_acts_like_torch_agent(models, name):
    """Same observations, argmax codes: RuntimeAgent (onnxruntime + blend_chunks) == TorchAgent (torch + ChunkAverager)."""
    from vqbet_core.agent import TorchAgent

    run, folder, _ = models[name]
    torch_agent = TorchAgent(run, temperature=0.0)
    rt_agent = RuntimeAgent(folder, temperature=0.0, threads=1)
    goal = np.array([0.0, -1.0], np.float32) if name == "goal" else None
    for agent in (torch_agent, rt_agent):
        agent.reset(goal)
    assert rt_agent.needs_goal == (name == "goal")
    for obs in observations(8, image=name == "image"):
        np.testing.assert_allclose(rt_agent.act(obs), torch_agent.act(obs), atol=1e-4)


def test_named_goal_equals_its_vector(models):
    _, folder, _ = models["goal"]
    a, b = PolicyRuntime(folder, temperature=0.0), PolicyRuntime(folder, temperature=0.0)
    a.reset(goal="down")
    b.reset(goal=[0.0, -1.0])
    for obs in observations(3):
        a.observe(obs, {}, 0.0)
        b.observe(obs, {}, 0.0)
    np.testing.assert_array_equal(a.predict().actions, b.predict().actions)
    assert a.goal_name == "down" and b.goal_name is None


def test_chunk_times_latency_drop_and_history_holds_features(models):
    _, folder, _ = models["image"]
    rt = PolicyRuntime(folder, seed=0)
    assert rt.spec.control_hz == 5.0 and rt.providers[-1] == "CPUExecutionProvider"
    obs = observations(4, image=True)
    for k, o in enumerate(obs):
        rt.observe({"state": o["state"]}, {c: o[c] for c in ("camera_front", "camera_wrist")}, stamp=100.0 + 0.2 * k)
    # the history holds fused feature vectors (state + 2 cameras x 512), not images
    assert rt.history.stacked().shape == (3, 2 + 2 * 512)
    chunk = rt.predict()
    np.testing.assert_allclose(chunk.times, 100.6 + 0.2 * np.arange(3))
    assert chunk.stamp == pytest.approx(100.6) and chunk.actions.shape == (3, 2) and chunk.actions.dtype == np.float32
    assert set(chunk.timings) == {"preprocess", "encoder", "policy", "sample_decode", "total"}
    assert chunk.timings["encoder"] > 0 and rt.last_timings == chunk.timings
    late = rt.predict(now=100.6 + 0.25)  # inference took longer than one period: point 0 is skipped
    np.testing.assert_allclose(late.times, 100.6 + 0.2 * np.arange(1, 3))
    # a bigger raw frame is cropped/resized by the model's preprocessing
    rt.observe({"state": obs[0]["state"]}, {"camera_front": np.zeros((48, 64, 3), np.uint8), "camera_wrist": obs[0]["camera_wrist"]}, 101.0)
    # predict_blended keeps the running blend; reset clears it
    rt.predict_blended()
    assert rt.blended is not None
    rt.reset()
    assert rt.blended is None and len(rt.history) == 0


def test_sampling_is_seeded_and_temperature_zero_is_argmax(models):
    _, folder, _ = models["vqbet"]
    obs = observations(6, seed=3)

    def run(seed, temperature=None):
        rt = PolicyRuntime(folder, seed=seed, temperature=temperature)
        out = []
        for o in obs:
            rt.observe(o, {}, 0.0)
            out.append(rt.predict().actions)
        return np.stack(out)

    np.testing.assert_array_equal(run(7), run(7))
    assert not all(np.array_equal(run(s), run(7)) for s in range(8))  # temperature 1: seeds matter
    np.testing.assert_array_equal(run(1, 0.0), run(2, 0.0))


def test_runtime_does_not_import_torch(models):
    folder = models["image"][1]
    code = (
        "import sys, numpy as np\n"
        "from vqbet_core.runtime import PolicyRuntime, blend_chunks, drop_past\n"
        "from vqbet_core.runtime.agent import RuntimeAgent\n"
        f"rt = PolicyRuntime({str(folder)!r})\n"
        "im = np.zeros((32, 32, 3), np.uint8)\n"
        "rt.observe({'state': np.zeros(2)}, {'camera_front': im, 'camera_wrist': im}, 0.0)\n"
        "c = drop_past(blend_chunks(None, rt.predict()), 0.0)\n"
        "assert c.actions.shape == (3, 2)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cli_export_and_eval_with_model(models, work, capsys):
    run = models["vqbet"][0]
    out = work / "cli_model"
    assert vqbet(["export", "--checkpoint", str(run), "--out", str(out), "--parity-steps", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["max_abs_error"] < 1e-4 and report["model"] == str(out)
    # re-exporting over an earlier export replaces it
    assert vqbet(["export", "--checkpoint", str(run), "--out", str(out), "--parity-steps", "2"]) == 0
    capsys.readouterr()
    assert vqbet(["eval", "--model", str(out), "--env", "multipath", "--episodes", "2", "--max-steps", "15"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["env"] == "multipath" and metrics["source"] == str(out)
    # the same rollouts spread over two processes print the same metrics
    assert vqbet(["eval", "--model", str(out), "--env", "multipath", "--episodes", "2", "--max-steps", "15",
                  "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics
    assert vqbet(["eval", "--model", str(out), "--env", "multipath", "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    assert metrics["encoder_precision"] is None  # a state model has no encoder
    # --precision: only for exported image models, and only a precision the folder has
    assert vqbet(["eval", "--checkpoint", str(run), "--env", "multipath", "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "only for an exported model" in err and err.count("\n") == 1


def test_parallel_rollout_equals_one_process(models):
    """Episodes reseed the sampler from their env seed: two processes give the one-process trajectories."""
    from vqbet_core.evaluate import RolloutSpec, make_agent, parallel_rollout, rollout, run_episode
    from vqbet_core.sim import make_env

    spec = RolloutSpec(env="multipath", env_args={}, checkpoint=str(models["vqbet"][0]))
    env = make_env("multipath")
    one = rollout(env, make_agent(spec), 4, seed=7, max_steps=20)
    two = parallel_rollout(spec, 4, 2, seed=7, max_steps=20)
    assert [r.mode for r in one[0]] == [r.mode for r in two[0]]
    for a, b in zip(one[1], two[1]):
        np.testing.assert_array_equal(a, b)
    alone = rollout(env, make_agent(spec), 1, seed=9, max_steps=20)  # episode 2 on its own
    np.testing.assert_array_equal(alone[1][0], one[1][2])

    class OtherDraws:  # same env seed, other sampling draws: the trajectory must change (sampling matters here)
        def __init__(self, agent):
            self.agent = agent

        def reseed(self, seed):
            self.agent.reseed(seed + 1000)

        def __getattr__(self, name):
            return getattr(self.agent, name)

    changed = [not np.array_equal(run_episode(env, OtherDraws(make_agent(spec)), 7 + ep, 20)[1], one[1][ep])
               for ep in range(4)]
    assert any(changed)


def test_bench_policy_reports_stages_and_speedup(models, capsys):
    from vqbet_core.runtime import bench

    for name, extra in (("vqbet", []), ("image", ["--sizes", str(IMG)])):
        assert bench.main(["--model", str(models[name][1]), "--steps", "4", "--warmup", "1", "--threads", "1", *extra]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        label = "state" if name == "vqbet" else f"{IMG}x{IMG}"
        entry = out["results"][label]
        stages = {"preprocess", "policy", "sample_decode", "total"} | ({"encoder"} if name == "image" else set())
        assert stages <= set(entry["runtime_ms"]) and stages <= set(entry["torch_eager_ms"])
        assert entry["runtime_ms"]["total"]["p50"] > 0 and out["speedup"][label] == entry["speedup"] > 0
        assert 0 <= entry["outside_graphs_fraction"] < 1


# ---------------------------------------------------------------------- bad folders and inputs
def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture
def copy_of(models, tmp_path):
    count = iter(range(100))

    def make(name: str) -> Path:
        dst = tmp_path / f"{name}{next(count)}"
        shutil.copytree(models[name][1], dst)
        return dst
    return make


def edit_yaml(folder: Path, **changes) -> None:
    meta = yaml.safe_load((folder / "model.yaml").read_text())
    meta.update(changes)
    (folder / "model.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


def test_missing_folder_and_files(copy_of, tmp_path):
    with pytest.raises(ModelFolderError) as e:
        PolicyRuntime(tmp_path / "nope")
    assert "model folder not found" in one_line(e)
    for name, missing in (("vqbet", "policy.onnx"), ("vqbet", "model.yaml"), ("vqbet", "arrays.npz"), ("image", "encoder.onnx")):
        folder = copy_of(name)
        (folder / missing).unlink()
        with pytest.raises(ModelFolderError) as e:
            PolicyRuntime(folder)
        assert missing in one_line(e) and "missing" in one_line(e)
        shutil.rmtree(folder)


def test_corrupt_onnx_and_changed_files(copy_of):
    folder = copy_of("vqbet")
    (folder / "policy.onnx").write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(ModelFolderError) as e:
        PolicyRuntime(folder)
    assert "policy.onnx" in one_line(e) and "changed since export" in one_line(e)
    meta = yaml.safe_load((folder / "model.yaml").read_text())
    from vqbet_core.runtime.spec import sha256_file

    meta["files"]["policy"]["sha256"] = sha256_file(folder / "policy.onnx")  # hash fits, content is still garbage
    (folder / "model.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ModelFolderError) as e:
        PolicyRuntime(folder)
    assert "policy.onnx" in one_line(e) and "not a loadable ONNX model" in one_line(e)
    (folder / "model.yaml").write_text("obs_keys: [state\n")
    with pytest.raises(ModelFolderError) as e:
        PolicyRuntime(folder)
    assert "not valid YAML" in one_line(e)


def test_metadata_that_contradicts_the_graph(copy_of):
    folder = copy_of("vqbet")
    edit_yaml(folder, obs_window=5)
    with pytest.raises(ModelFolderError) as e:
        PolicyRuntime(folder)
    assert "policy.onnx" in one_line(e) and "'obs'" in one_line(e) and "[batch, 5, 2]" in one_line(e)
    folder = copy_of("bet")
    edit_yaml(folder, action_chunk=4)
    with pytest.raises(ModelFolderError) as e:
        PolicyRuntime(folder)
    assert "decode_table" in one_line(e)
    folder = copy_of("goal")
    edit_yaml(folder, goal_dim=0, goal_names=[])
    with pytest.raises(ModelFolderError) as e:
        PolicyRuntime(folder)
    assert "inputs" in one_line(e) and "goal" in one_line(e)
    folder = copy_of("image")
    meta = yaml.safe_load((folder / "model.yaml").read_text())
    meta["images"]["camera_front"]["size"] = [64, 64]
    (folder / "model.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ModelFolderError) as e:
        PolicyRuntime(folder)
    assert "encoder.onnx" in one_line(e) and "images.camera_front" in one_line(e)
    folder = copy_of("vqbet")
    edit_yaml(folder, joint_names=["only_one"])
    with pytest.raises(ModelFolderError) as e:
        PolicyRuntime(folder)
    assert "joint_names" in one_line(e)


def test_wrong_observations_at_run_time(models):
    rt = PolicyRuntime(models["image"][1])
    frame = np.zeros((IMG, IMG, 3), np.uint8)
    cams = {"camera_front": frame, "camera_wrist": frame}
    bad = [
        ({"state": np.zeros(3)}, cams, "'state': expected shape (2,)"),
        ({}, cams, "do not match the model's low-dim keys"),
        ({"state": np.zeros(2), "extra": np.zeros(1)}, cams, "do not match"),
        ({"state": np.array([np.nan, 0.0])}, cams, "non-finite"),
        ({"state": np.zeros(2)}, {"camera_front": frame}, "do not match the model's cameras"),
        ({"state": np.zeros(2)}, {**cams, "camera_wrist": frame.astype(np.float32)}, "image 'camera_wrist': image must be RGB uint8"),
        ({"state": np.zeros(2)}, {**cams, "camera_front": frame[:, :, :1]}, "image must be RGB uint8"),
    ]
    for lowdim, images, text in bad:
        with pytest.raises(VqbetError) as e:
            rt.observe(lowdim, images, 0.0)
        assert text in one_line(e)
    with pytest.raises(VqbetError, match="no observation yet"):
        rt.predict()
    goal_rt = PolicyRuntime(models["goal"][1])
    goal_rt.observe({"state": np.zeros(2)}, {}, 0.0)
    with pytest.raises(VqbetError, match="goal-conditioned: set a goal"):
        goal_rt.predict()
    with pytest.raises(VqbetError, match="unknown goal name 'sideways'.*down, up"):
        goal_rt.set_goal("sideways")
    with pytest.raises(VqbetError, match="expected 2 finite numbers"):
        goal_rt.set_goal([1.0, 2.0, 3.0])
    with pytest.raises(VqbetError, match="not goal-conditioned"):
        rt.set_goal([0.0, 1.0])
    with pytest.raises(VqbetError, match="providers"):
        PolicyRuntime(models["vqbet"][1], providers=["NoSuchExecutionProvider"])


def test_provider_preference_and_explicit_choice(monkeypatch):
    import onnxruntime as ort

    from vqbet_core.runtime.policy import resolve_providers

    assert resolve_providers(None)[-1] == "CPUExecutionProvider"
    assert resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    gpu_build = ["CUDAExecutionProvider", "AzureExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu_build)  # what onnxruntime-gpu with TensorRT reports
    assert resolve_providers(None) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_export_cli_errors_are_one_line(tmp_path, models, capsys):
    assert vqbet(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a checkpoint folder" in err and "\n" not in err
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert vqbet(["export", "--checkpoint", str(models["bet"][0]), "--out", str(keep)]) == 2
    assert "is not an exported model folder" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "mine"
