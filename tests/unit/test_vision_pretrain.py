"""Encoder pretraining on labelled simulator frames: frame collection, learning, the weights file, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vqbet_core.cli.main import main as vqbet_main
from vqbet_core.errors import VqbetError
from vqbet_core.vision.encoder import build_encoder
from vqbet_core.vision.pretrain import collect_frames, linear_probe_r2, pretrain_encoder


def squares(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """White frames with one blue 8x8 square; label = the square's position in [-1, 1]^2."""
    rng = np.random.default_rng(seed)
    labels = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    images = np.full((n, size, size, 3), 255, np.uint8)
    for i, (x, y) in enumerate(labels):
        cx, cy = int((x + 1) / 2 * (size - 8)), int((y + 1) / 2 * (size - 8))
        images[i, cy : cy + 8, cx : cx + 8] = (40, 80, 200)
    return images, labels


def test_pretraining_learns_positions_and_the_kept_trunk_encodes_them():
    torch.set_num_threads(2)
    images, labels = squares(400)
    encoder, metrics = pretrain_encoder(images, labels, steps=30, batch_size=16, lr=2e-3, val_fraction=0.1,
                                        label_names=["x", "y"])
    assert metrics["val_frames"] == 40 and set(metrics["val_rmse"]) == {"x", "y"}
    assert metrics["val_r2"] > 0.5, metrics
    assert all(metrics["val_rmse"][k] < metrics["val_rmse_mean_predictor"][k] for k in ("x", "y")), metrics
    assert metrics["probe_frames"] == 360 and metrics["val_r2_linear_probe"] > 0.9, metrics
    # (the metrics above already go through the kept trunk); a linear probe on its features, new frames
    probe_images, probe_labels = squares(300, seed=1)
    assert linear_probe_r2(encoder, probe_images, probe_labels, np.arange(200), np.arange(200, 300)) > 0.9
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_pretraining_rejects_bad_inputs():
    images, labels = squares(20)
    with pytest.raises(VqbetError, match="RGB uint8"):
        pretrain_encoder(images.astype(np.float32), labels, steps=1)
    with pytest.raises(VqbetError, match=r"\(N, L\)"):
        pretrain_encoder(images, labels[:5], steps=1)
    with pytest.raises(VqbetError, match="steps >= 1"):
        pretrain_encoder(images, labels, steps=0)
    with pytest.raises(VqbetError, match="at least"):
        pretrain_encoder(images[:2], labels[:2], steps=1)


def test_pusht_frames_are_labelled_with_the_true_scene_and_reproducible():
    pytest.importorskip("gym_pusht")
    from vqbet_core.sim.pusht import PushTImageEnv

    env = PushTImageEnv(image_size=32, render_size=64)
    try:
        images, labels = collect_frames(env, 12, seed=5, frames_per_reset=4)
        again, labels_again = collect_frames(env, 12, seed=5, frames_per_reset=4)
        # the last frame's label is the env's state right now
        np.testing.assert_allclose(labels[-1], env.pretrain_labels())
    finally:
        env.close()
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (12, len(env.pretrain_label_names)) and np.all(np.abs(labels) <= 1.0)
    np.testing.assert_allclose(labels[:, 4] ** 2 + labels[:, 5] ** 2, 1.0, atol=1e-5)  # (cos, sin) of the T's angle
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert len({tuple(row) for row in labels[:, 2:4].round(3)}) >= 3  # several scenes, not one


def test_kitchen_frames_show_doors_and_knobs_anywhere_in_their_ranges():
    """Kitchen resets always show the closed kitchen: ``pretrain_scene`` opens doors / turns knobs at random."""
    pytest.importorskip("gymnasium_robotics")
    from vqbet_core.sim.kitchen import KitchenEnv

    env = KitchenEnv(image_size=32)
    try:
        images, labels = collect_frames(env, 12, seed=5, frames_per_reset=3)
        np.testing.assert_allclose(labels[-1], env.pretrain_labels())  # the label is the state behind the frame
        names = list(env.pretrain_label_names)
    finally:
        env.close()
    assert images.shape == (12, 32, 32, 3) and labels.shape == (12, len(names)) and np.all(np.isfinite(labels))
    assert {"microwave", "slide_cabinet", "light_switch", "knob_Joint_1", "panda0_joint1"} <= set(names)
    assert np.all(np.abs(labels) <= 1.2)  # joint ranges mapped to [-1, 1] (limits are soft in MuJoCo)
    objects = labels[:, names.index("knob_Joint_1"):]
    assert np.all(objects.std(axis=0) > 0.05)  # every door, knob and switch varies across the scenes
    assert len({img.tobytes() for img in images}) == 12


def test_cli_writes_loadable_weights_and_a_report(tmp_path, capsys):
    pytest.importorskip("gym_pusht")
    out = tmp_path / "enc.safetensors"
    rc = vqbet_main(["pretrain-encoder", "--env", "pusht_image", "--env-arg", "image_size=32", "--frames", "24",
                     "--steps", "2", "--batch-size", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "enc.safetensors.json").read_text())
    assert report["frames"] == 24 and report["image_size"] == [32, 32] and report["steps"] == 2
    encoder = build_encoder({"weights": str(out)})
    assert encoder.fingerprint() == report["fingerprint"]
    assert encoder.fingerprint() != build_encoder({"weights": "none"}).fingerprint()


@pytest.mark.parametrize("argv, message", [
    (["--env", "multipath"], "cannot label frames"),
    (["--env", "pusht_image", "--frames", "3"], "--frames must be >= 10"),
    (["--env", "nosuch"], "unknown env"),
])
def test_cli_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    rc = vqbet_main(["pretrain-encoder", *argv, "--out", str(tmp_path / "e.safetensors"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert vqbet_main(["pretrain-encoder", "--env", "pusht_image", "--out", str(tmp_path / "e.pt")]) == 2
    assert "expected a .safetensors" in capsys.readouterr().err


def test_kitchen_cli_runs_in_a_fresh_process(tmp_path):
    """A fresh interpreter (torchvision not yet imported) must not crash after MuJoCo's renderer is up."""
    pytest.importorskip("gymnasium_robotics")
    import subprocess
    import sys

    out = tmp_path / "k.safetensors"
    proc = subprocess.run([sys.executable, "-m", "vqbet_core.cli.main", "pretrain-encoder", "--env", "kitchen",
                           "--env-arg", "image_size=32", "--frames", "12", "--steps", "2", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.exists() and report["env"] == "kitchen" and "microwave" in report["val_rmse"]
