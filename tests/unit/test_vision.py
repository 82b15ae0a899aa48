"""Vision: one preprocessing path for training and runtime, frozen ResNet-18, weights files, feature cache, fusion, ONNX."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
import yaml

from vqbet_core.calibration import load_calibration
from vqbet_core.data.store import ZarrDataset
from vqbet_core.errors import VqbetError
from vqbet_core.vision.encoder import (
    FEATURE_DIM,
    ImageEncoder,
    build_encoder,
    export_encoder_onnx,
    save_encoder_weights,
)
from vqbet_core.vision.feature_cache import cache_key, data_fingerprint, encoded_features
from vqbet_core.vision.fusion import fuse_observation, fusion_layout
from vqbet_core.vision.preprocess import ImagePreprocess, area_resize, dataset_camera_preprocess

torch.set_num_threads(2)

CALIBRATION = """
robot: test_arm
joint_names: [j1, j2]
joint_limits: {lower: [-1, -1], upper: [1, 1], velocity: 1.0}
control_hz: 10
cameras:
  front: {topic: /camera/image_raw, size: [96, 96], crop: [80, 0, 480, 480]}
"""


@pytest.fixture(scope="module")
def frozen() -> ImageEncoder:
    """One "none" encoder shared by tests that only read it (building ResNet-18 is not free on 2 cores)."""
    return build_encoder({"weights": "none"})


def camera_frames(n: int, h: int = 480, w: int = 640, seed: int = 0) -> np.ndarray:
    """Structured RGB frames (gradients, a moving box, sensor noise) - resizing them is not trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(n):
        img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy + 40 * i) % 256], -1).astype(np.int16)
        img[100 + 10 * i : 220 + 10 * i, 200:330] = (250, 30, 30)
        img += rng.integers(-12, 13, size=img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def small_dataset(path, n_episodes=2, length=6, size=32, seed=0, attrs=None) -> ZarrDataset:
    rng = np.random.default_rng(seed)
    ds = ZarrDataset.create(path, attrs=attrs)
    for _ in range(n_episodes):
        ds.add_episode({
            "camera_front": rng.integers(0, 256, size=(length, size, size, 3), dtype=np.uint8),
            "robot_joint": rng.normal(size=(length, 2)).astype(np.float32),
        })
    return ds


# ---------------------------------------------------------------------- one preprocessing definition
def test_raw_frame_gives_the_same_tensor_in_training_and_at_runtime(tmp_path, frozen):
    calib_path = tmp_path / "arm.yaml"
    calib_path.write_text(CALIBRATION)
    calib = load_calibration(calib_path)
    raw = camera_frames(4)

    # training path: the recorder crop-resizes and stores uint8; training reads it back and normalizes
    ds = ZarrDataset.create(tmp_path / "d.zarr", attrs=calib.to_attrs())
    recorded = np.stack([calib.cameras["front"].preprocess.crop_resize(f) for f in raw])
    ds.add_episode({"camera_front": recorded, "robot_joint": np.zeros((4, 2), np.float32)})
    ds = ZarrDataset.open(tmp_path / "d.zarr")
    stored = ds.read("camera_front")
    train_pre = dataset_camera_preprocess(ds.attrs, "camera_front", stored.shape[1:3], (96, 96))
    train_batch = train_pre.to_model_input(stored[None])[0]  # (B=1, T=4, 3, H, W) as a training batch

    # runtime path: preprocessing as written into model.yaml, applied to each raw camera frame
    runtime_pre = ImagePreprocess.from_dict(yaml.safe_load(yaml.safe_dump(train_pre.to_dict())))
    assert runtime_pre.crop == (80, 0, 480, 480)
    runtime = np.stack([runtime_pre.to_model_input(runtime_pre.crop_resize(f)) for f in raw])

    assert train_batch.dtype == runtime.dtype == np.float32
    assert train_batch.shape == runtime.shape == (4, 3, 96, 96)
    np.testing.assert_array_equal(train_batch, runtime)

    # the comparison is sharp enough to catch the usual deployment drifts
    drifts = {
        "bgr": runtime_pre.to_model_input(runtime_pre.crop_resize(np.ascontiguousarray(raw[0][..., ::-1]))),
        "linear_resize": runtime_pre.to_model_input(cv2.resize(raw[0][:, 80:560], (96, 96), interpolation=cv2.INTER_LINEAR)),
        "no_crop": runtime_pre.to_model_input(cv2.resize(raw[0], (96, 96), interpolation=cv2.INTER_AREA)),
        "no_normalize": np.moveaxis(runtime_pre.crop_resize(raw[0]).astype(np.float32) / 255.0, -1, 0),
    }
    for name, tensor in drifts.items():
        assert np.abs(tensor - runtime[0]).max() > 0.05, name

    # and the features match too: cached (batched, training) vs one frame at a time (runtime)
    encoder = frozen
    cached = encoded_features(ds, "camera_front", encoder, {"weights": "none", "image_size": 96}, tmp_path / "cache", progress=False)
    with torch.no_grad():
        live = np.concatenate([encoder(torch.from_numpy(t[None])).numpy() for t in runtime])
    np.testing.assert_allclose(cached, live, atol=1e-5, rtol=1e-5)


def test_area_resize_halves_first_and_stays_a_box_filter():
    rng = np.random.default_rng(0)
    smooth = cv2.GaussianBlur(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8), (0, 0), 3)
    for size in ((96, 96), (224, 224), (320, 240), (640, 480), (100, 300)):
        out = area_resize(smooth, size)
        assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
        direct = cv2.resize(smooth, size, interpolation=cv2.INTER_AREA)
        # the same box average up to the rounding of the intermediate half-size frame
        assert np.abs(out.astype(int) - direct.astype(int)).mean() < 1.0, size
    assert area_resize(smooth, (640, 480)) is smooth  # already the size: untouched
    odd = rng.integers(0, 255, (101, 203, 3), dtype=np.uint8)
    assert area_resize(odd, (50, 25)).shape == (25, 50, 3)
    assert ImagePreprocess(size=(96, 96)).crop_resize(smooth).tobytes() == area_resize(smooth, (96, 96)).tobytes()


def test_dataset_camera_preprocess_rejects_size_mismatch(tmp_path):
    assert dataset_camera_preprocess({}, "camera_front", (32, 48)).size == (48, 32)
    with pytest.raises(VqbetError, match="vision.image_size"):
        dataset_camera_preprocess({}, "camera_front", (32, 32), (96, 96))
    attrs = {"cameras": {"front": {"preprocess": {"size": [64, 64]}}}}
    with pytest.raises(VqbetError, match="recorded preprocessing"):
        dataset_camera_preprocess(attrs, "camera_front", (32, 32))


# ---------------------------------------------------------------------- frozen encoder
def _batch(n=2, size=32, seed=0) -> torch.Tensor:
    frames = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return torch.from_numpy(ImagePreprocess(size=(size, size)).to_model_input(frames))


def _bn_buffers(encoder):
    return {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k or "num_batches" in k}


def test_frozen_encoder_has_no_grads_is_deterministic_and_keeps_bn_stats():
    encoder = build_encoder({"weights": "none"})
    assert not any(p.requires_grad for p in encoder.parameters())
    again = build_encoder({"weights": "none"})  # "none" = fixed-seed init, whatever the global RNG did
    torch.manual_seed(1234)
    assert encoder.fingerprint() == again.fingerprint()

    x = _batch()
    before = _bn_buffers(encoder)
    encoder.train()  # a training loop calling model.train() must not unfreeze anything
    assert not encoder.training and not any(m.training for m in encoder.modules())
    out1 = encoder(x)
    out2 = encoder(x)
    assert out1.shape == (2, FEATURE_DIM) and out1.dtype == torch.float32
    assert not out1.requires_grad
    assert torch.equal(out1, out2)
    assert torch.equal(out1, again(x))
    for k, v in _bn_buffers(encoder).items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(VqbetError, match=r"\(batch, 3, height, width\)"):
        encoder(x[:, :2])


def test_finetune_mode_trains_weights_but_not_bn_statistics():
    encoder = build_encoder({"weights": "none", "finetune": True})
    assert all(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.training and encoder.layer1.training
    assert not any(m.training for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = _bn_buffers(encoder)
    encoder(_batch()).pow(2).mean().backward()
    assert encoder.conv1.weight.grad is not None and encoder.conv1.weight.grad.abs().sum() > 0
    for k, v in _bn_buffers(encoder).items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------- weights
def test_weights_file_round_trip_safetensors_and_pth(tmp_path):
    trained = ImageEncoder(seed=7)  # stands in for fine-tuned / ImageNet weights: differs from "none"
    trained.bn1.running_mean.uniform_(-0.5, 0.5)  # BN statistics must travel too
    path = tmp_path / "run" / "encoder.safetensors"
    fingerprint = save_encoder_weights(trained, path)
    loaded = build_encoder({"weights": str(path)})
    assert loaded.fingerprint() == fingerprint == trained.fingerprint()
    assert fingerprint != ImageEncoder().fingerprint()
    x = _batch()
    assert torch.equal(loaded(x), trained.eval()(x))

    # a full torchvision state dict (with the fc classifier) saved by torch.save
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    from_pth = build_encoder({"weights": str(tmp_path / "resnet18.pth")})
    assert torch.equal(from_pth.layer4[1].conv2.weight, net.layer4[1].conv2.weight)


def test_bad_weights_are_one_line_errors(tmp_path):
    with pytest.raises(VqbetError, match="file not found"):
        build_encoder({"weights": str(tmp_path / "missing.safetensors")})
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(VqbetError, match="must end in"):
        build_encoder({"weights": str(tmp_path / "w.txt")})
    torch.save({"linear.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(VqbetError, match="not a ResNet-18 state dict"):
        build_encoder({"weights": str(tmp_path / "other.pth")})
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VqbetError, match="cannot read") as err:
        build_encoder({"weights": str(tmp_path / "junk.safetensors")})
    assert "\n" not in str(err.value)
    with pytest.raises(VqbetError, match="feature_dim"):
        build_encoder({"weights": "none", "feature_dim": 256})


def test_imagenet_weights_use_torchvision_hub_cache(tmp_path, monkeypatch):
    """The real ``weights: imagenet`` code path, provisioned offline the way a robot computer would be."""
    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(3)
    net = resnet18(weights=None)
    torch.save(net.state_dict(), hub / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1])
    encoder = build_encoder({"weights": "imagenet"})
    assert torch.equal(encoder.conv1.weight, net.conv1.weight)
    assert not encoder.conv1.weight.requires_grad


def test_imagenet_weights_without_network_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens: the download fails at once, anywhere
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(VqbetError, match=r"vision.weights=imagenet: cannot get https://download.pytorch.org/.*copy that file into") as err:
        build_encoder({"weights": "imagenet"})
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- feature cache
VISION32 = {"weights": "none", "image_size": 32}


def test_feature_cache_miss_then_hit(tmp_path, caplog, frozen):
    ds = small_dataset(tmp_path / "d.zarr")
    encoder = frozen
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="vqbet_core.vision.feature_cache"):
        first = encoded_features(ds, "camera_front", encoder, VISION32, cache, batch_size=5, progress=False)
    assert "miss" in caplog.text
    assert first.shape == (12, FEATURE_DIM) and first.dtype == np.float32
    files = list(cache.glob("*.npy"))
    assert len(files) == 1

    # the features are the encoder's, frame by frame
    pre = ImagePreprocess(size=(32, 32))
    with torch.no_grad():
        direct = encoder(torch.from_numpy(pre.to_model_input(ds.read("camera_front")))).numpy()
    np.testing.assert_allclose(first, direct, atol=1e-5, rtol=1e-5)

    # second call reads the file: prove it by planting a marker in it
    marker = np.full_like(first, 7.0)
    np.save(files[0], marker)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vqbet_core.vision.feature_cache"):
        again = encoded_features(str(tmp_path / "d.zarr"), "camera_front", encoder, VISION32, cache, progress=False)
    assert "hit" in caplog.text
    np.testing.assert_array_equal(again, marker)

    # a corrupt cache file is re-encoded, not trusted
    files[0].write_bytes(b"garbage")
    np.testing.assert_allclose(encoded_features(ds, "camera_front", encoder, VISION32, cache, progress=False), first, atol=1e-6)


def test_feature_cache_invalidated_by_data_and_encoder_changes(tmp_path, frozen):
    path = tmp_path / "d.zarr"
    ds = small_dataset(path)
    encoder = frozen
    pre = ImagePreprocess(size=(32, 32))
    base = cache_key(ds, "camera_front", encoder, pre)
    assert cache_key(ZarrDataset.open(path), "camera_front", build_encoder(VISION32), pre) == base  # stable

    # uncommitted leftovers of an interrupted episode do not count
    writer = ZarrDataset.open(path, mode="a")
    writer.append_steps({"camera_front": np.zeros((3, 32, 32, 3), np.uint8), "robot_joint": np.zeros((3, 2), np.float32)})
    assert cache_key(ZarrDataset.open(path, mode="r"), "camera_front", encoder, pre) == base
    writer.discard_episode()

    # encoder settings: other weights, other normalization
    assert cache_key(ds, "camera_front", ImageEncoder(seed=1), pre) != base
    assert cache_key(ds, "camera_front", encoder, ImagePreprocess(size=(32, 32), mean=(0.5, 0.5, 0.5))) != base

    # data: one pixel changed in place, then a new episode
    ds.array("camera_front")[3, 0, 0, 0] ^= 1
    changed = cache_key(ds, "camera_front", encoder, pre)
    assert changed != base
    ds.add_episode({"camera_front": np.zeros((2, 32, 32, 3), np.uint8), "robot_joint": np.zeros((2, 2), np.float32)})
    assert cache_key(ds, "camera_front", encoder, pre) not in (base, changed)

    cache = tmp_path / "cache"
    feats = encoded_features(ds, "camera_front", encoder, VISION32, cache, progress=False)
    assert feats.shape == (14, FEATURE_DIM)
    encoded_features(ds, "camera_front", ImageEncoder(seed=1), VISION32, cache, progress=False)
    assert len(list(cache.glob("*.npy"))) == 2


def test_training_keeps_features_in_vqbet_cache_or_cache_dir(tmp_path, monkeypatch, capsys):
    """`vqbet train` caches frozen-encoder features in $VQBET_CACHE/features, or in --cache-dir; never beside the data."""
    from vqbet_core.cli.main import main as vqbet

    data = tmp_path / "data" / "d.zarr"
    rng = np.random.default_rng(0)
    ds = ZarrDataset.create(data)
    for _ in range(2):
        ds.add_episode({"camera_front": rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8),
                        "robot_joint": rng.normal(size=(6, 2)).astype(np.float32),
                        "action": rng.normal(size=(6, 2)).astype(np.float32)})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny_image", "policy": "bet", "obs_window": 2, "action_chunk": 1,
        "data": {"obs_keys": ["robot_joint"], "image_keys": ["camera_front"], "action_key": "action", "val_fraction": 0.0},
        "vision": VISION32, "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 16}, "heads": {"hidden": 16}, "bet": {"n_bins": 2},
        "train": {"phase1_steps": 2, "phase2_steps": 2, "batch_size": 4, "phase1_batch_size": 8, "log_every": 1,
                  "val_every": 2, "ckpt_every": 2, "device": "cpu"}}))
    env_cache, flag_cache = tmp_path / "env_cache", tmp_path / "flag_cache"
    monkeypatch.setenv("VQBET_CACHE", str(env_cache))
    assert vqbet(["train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "run1"), "--no-progress"]) == 0
    assert len(list((env_cache / "features").glob("*.npy"))) == 1
    assert vqbet(["train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "run2"), "--no-progress",
                  "--cache-dir", str(flag_cache)]) == 0
    assert len(list(flag_cache.glob("*.npy"))) == 1
    assert sorted(p.name for p in data.parent.iterdir()) == ["d.zarr"]  # nothing written beside the dataset
    capsys.readouterr()


def test_data_fingerprint_without_local_store_hashes_frames(tmp_path):
    import zarr

    ds = small_dataset(tmp_path / "d.zarr")
    mem = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=2)
    mem.create_group("data")
    mem.create_group("meta").create_array("episode_ends", data=ds.episode_ends)
    frames = ds.read("camera_front")
    mem["data"].create_array("camera_front", data=frames, chunks=(4, 32, 32, 3))
    in_memory = ZarrDataset(mem, tmp_path / "memory", "r")
    first = data_fingerprint(in_memory, "camera_front")
    assert first == data_fingerprint(in_memory, "camera_front")
    mem["data/camera_front"][5, 1, 1, 1] = frames[5, 1, 1, 1] ^ 1
    assert data_fingerprint(in_memory, "camera_front") != first


def test_feature_cache_rejects_bad_inputs(tmp_path, frozen):
    ds = small_dataset(tmp_path / "d.zarr")
    encoder = frozen
    with pytest.raises(VqbetError, match="frozen encoder"):
        encoded_features(ds, "camera_front", encoder, {**VISION32, "finetune": True}, tmp_path / "c")
    with pytest.raises(VqbetError, match="vision.image_size is 96x96"):
        encoded_features(ds, "camera_front", encoder, {"weights": "none", "image_size": 96}, tmp_path / "c")
    with pytest.raises(VqbetError, match="RGB uint8"):
        encoded_features(ds, "robot_joint", encoder, VISION32, tmp_path / "c")
    with pytest.raises(VqbetError, match="missing key data/camera_side"):
        encoded_features(ds, "camera_side", encoder, VISION32, tmp_path / "c")


# ---------------------------------------------------------------------- fusion
def test_fusion_order_is_obs_keys_then_image_keys_in_config_order():
    lowdim = {"robot_joint": np.full((4, 3, 2), 1.0), "gripper": np.full((4, 3, 1), 2.0), "unused": np.zeros((4, 3, 9))}
    images = {"camera_wrist": np.full((4, 3, 5), 3.0, np.float32), "camera_front": np.full((4, 3, 5), 4.0, np.float32)}
    obs_keys, image_keys = ["gripper", "robot_joint"], ["camera_front", "camera_wrist"]
    fused = fuse_observation(lowdim, images, obs_keys, image_keys)
    assert fused.shape == (4, 3, 13) and fused.dtype == np.float32
    np.testing.assert_array_equal(fused[0, 0], [2, 1, 1, 4, 4, 4, 4, 4, 3, 3, 3, 3, 3])
    layout = fusion_layout({"robot_joint": 2, "gripper": 1, "camera_front": 5, "camera_wrist": 5}, obs_keys, image_keys)
    assert layout == {"gripper": (0, 1), "robot_joint": (1, 3), "camera_front": (3, 8), "camera_wrist": (8, 13)}

    # one runtime step gives exactly the matching row of the training array
    step = fuse_observation({k: v[2, 1] for k, v in lowdim.items()}, {k: v[2, 1] for k, v in images.items()}, obs_keys, image_keys)
    np.testing.assert_array_equal(step, fused[2, 1])
    # torch tensors (fine-tuning) follow the same order
    as_torch = fuse_observation({k: torch.from_numpy(v) for k, v in lowdim.items()},
                                {k: torch.from_numpy(v) for k, v in images.items()}, obs_keys, image_keys)
    np.testing.assert_array_equal(as_torch.numpy(), fused)


def test_fusion_errors():
    with pytest.raises(VqbetError, match="image features 'camera_side' is missing"):
        fuse_observation({"robot_joint": np.zeros((2, 3))}, {}, ["robot_joint"], ["camera_side"])
    with pytest.raises(VqbetError, match="leading shape"):
        fuse_observation({"robot_joint": np.zeros((2, 3))}, {"camera_front": np.zeros((3, 512))}, ["robot_joint"], ["camera_front"])
    with pytest.raises(VqbetError, match="mix numpy arrays and torch"):
        fuse_observation({"robot_joint": np.zeros((2, 3))}, {"camera_front": torch.zeros(2, 512)}, ["robot_joint"], ["camera_front"])


# ---------------------------------------------------------------------- ONNX
def test_onnx_export_matches_torch_with_dynamic_batch(tmp_path):
    import onnxruntime as ort

    encoder = ImageEncoder(seed=5)
    path = tmp_path / "encoder.onnx"
    err = export_encoder_onnx(encoder, [64, 48], path)
    assert err < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 4):
        x = _batch(n, size=64, seed=n)[:, :, :48, :].contiguous()  # width 64, height 48
        got = session.run(["features"], {"image": x.numpy()})[0]
        assert got.shape == (n, FEATURE_DIM)
        with torch.no_grad():
            np.testing.assert_allclose(got, encoder(x).numpy(), atol=1e-4)


def test_feature_cache_benchmark_runs_and_agrees():
    from vqbet_core.vision.feature_cache import bench_feature_cache

    r = bench_feature_cache(frames=12, episodes=2, image_size=32, batch=2, window=2, steps=1, train_steps=100, threads=2)
    assert r["frames"] == 12 and r["frames_per_step"] == 4
    assert r["max_abs_diff_cached_vs_naive"] < 1e-4  # cached features are the ones the naive path computes
    assert r["step_speedup"] > 1
