"""``vqbet inspect``: numbers that match the store, JSON and text output, plots, one-line errors."""

import json

import numpy as np
import pytest

from vqbet_core.cli.main import main as vqbet
from vqbet_core.data.store import ZarrDataset


def make_store(path, lengths=(3, 5, 4), image=False, modes=("a", "b", "a")):
    rng = np.random.default_rng(0)
    ds = ZarrDataset.create(path, {"source": "test", "control_hz": 10, "episode_modes": list(modes),
                                   "episode_seeds": list(range(30))})
    for n in lengths:
        ep = {"state": rng.normal(size=(n, 3)).astype(np.float32), "action": rng.normal(size=(n, 2)).astype(np.float32),
              "timestamp": np.arange(n) / 10.0}
        if image:
            ep["camera_front"] = rng.integers(0, 255, size=(n, 8, 8, 3), dtype=np.uint8)
        ds.add_episode(ep)
    return ds


def inspect(capsys, *argv):
    code = vqbet(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_report_matches_the_data(tmp_path, capsys):
    ds = make_store(tmp_path / "d.zarr")
    code, out, err = inspect(capsys, str(ds.path), "--json")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    r = json.loads(out)
    assert r["episodes"] == 3 and r["steps"] == 12
    assert r["length"] == {"min": 3, "mean": 4.0, "max": 5}
    assert set(r["keys"]) == {"action", "state", "timestamp"}
    assert r["keys"]["state"]["shape"] == [3] and r["keys"]["state"]["dtype"] == "float32"
    assert r["keys"]["timestamp"]["shape"] == [] and r["keys"]["timestamp"]["dtype"] == "float64"
    state = ds.read("state")
    for stat, fn in (("min", np.min), ("max", np.max), ("mean", np.mean), ("std", np.std)):
        np.testing.assert_allclose(r["keys"]["state"]["stats"][stat], fn(state.astype(np.float64), axis=0), atol=1e-5)
    assert r["mode_freq"] == pytest.approx({"a": 2 / 3, "b": 1 / 3}) and r["mode_counts"] == {"a": 2, "b": 1}
    assert r["attrs"]["source"] == "test" and r["attrs"]["control_hz"] == 10
    assert r["attrs"]["episode_seeds"] == "<list of 30>" and "episode_modes" not in r["attrs"]


def test_text_report(tmp_path, capsys):
    ds = make_store(tmp_path / "d.zarr")
    code, out, _ = inspect(capsys, str(ds.path))
    assert code == 0
    assert "episodes 3   steps 12   length min/mean/max 3/4.0/5" in out
    assert "state" in out and "float32" in out and "(3,)" in out
    assert "a: 0.667 (2)" in out and "b: 0.333 (1)" in out
    assert "source: \"test\"" in out


def test_leftover_steps_are_not_counted(tmp_path, capsys):
    ds = make_store(tmp_path / "d.zarr")
    ds.append_steps({"state": np.zeros((7, 3), np.float32), "action": np.zeros((7, 2), np.float32),
                     "timestamp": np.zeros(7)})  # never committed
    r = json.loads(inspect(capsys, str(ds.path), "--json")[1])
    assert r["steps"] == 12 and r["episodes"] == 3


def test_plot_with_contact_sheet(tmp_path, capsys):
    ds = make_store(tmp_path / "img.zarr", image=True)
    png = tmp_path / "inspect.png"
    code, out, _ = inspect(capsys, str(ds.path), "--json", "--plot", str(png))
    assert code == 0
    r = json.loads(out)
    assert r["keys"]["camera_front"]["image"] and "stats" not in r["keys"]["camera_front"]
    assert r["plot"] == str(png) and png.stat().st_size > 2000
    from vqbet_core.cli.inspect import _contact_sheet

    sheet = _contact_sheet(ds, "camera_front", episodes=2, columns=3)
    assert sheet.shape == (2 * 8, 3 * 8, 3)
    frames = ds.read("camera_front")
    np.testing.assert_array_equal(sheet[:8, :8], frames[0])  # first frame of episode 0
    np.testing.assert_array_equal(sheet[8:, 16:], frames[7])  # last frame of episode 1 (steps 3..7)


def test_lowdim_plot_without_camera(tmp_path, capsys):
    ds = make_store(tmp_path / "d.zarr")
    png = tmp_path / "h.png"
    assert inspect(capsys, str(ds.path), "--plot", str(png))[0] == 0
    assert png.stat().st_size > 1000


def test_bad_datasets_give_one_line(tmp_path, capsys):
    code, out, err = inspect(capsys, str(tmp_path / "missing.zarr"))
    assert code == 2 and out == "" and err.count("\n") == 1 and "not found" in err

    ZarrDataset.create(tmp_path / "empty.zarr")
    code, _, err = inspect(capsys, str(tmp_path / "empty.zarr"))
    assert code == 2 and err.count("\n") == 1 and "empty" in err

    ds = make_store(tmp_path / "nan.zarr")
    ds.root["data/action"][4] = [np.nan, 0.0]
    code, _, err = inspect(capsys, str(ds.path))
    assert code == 2 and err.count("\n") == 1 and "data/action" in err and "step 4" in err


def test_tokens_by_first_decision(tmp_path, capsys):
    """Two modes that share their first half (right) and split later (up / down): one token at the start,
    a token of their own after the split."""
    from tests.unit.test_train import tiny_cfg, two_mode_dataset
    from vqbet_core.train.trainer import Trainer

    data = two_mode_dataset(tmp_path / "two.zarr")
    run = tmp_path / "run"
    Trainer(tiny_cfg("bet", phase2_steps=1), data, run, progress=False).run()  # k-means bins: no tokenizer training
    code, out, _ = inspect(capsys, str(data), "--json", "--tokens", str(run), "--token-steps", "0,20,29")
    assert code == 0
    steps = json.loads(out)["tokens"]["steps"]
    assert steps["0"]["decisions"] == 2 and steps["0"]["distinct"] == 0  # both start to the right
    assert steps["20"]["distinct"] == 2  # up and down have their own bins
    assert steps["20"]["top_token"]["up"]["share"] == 1.0
    assert "29" not in steps or steps["29"]["decisions"] == 2  # a chunk must fit in the episode
    code, out, _ = inspect(capsys, str(data), "--tokens", str(run))
    assert code == 0 and "first decisions have a token of their own" in out
    no_modes = make_store(tmp_path / "nomodes.zarr", modes=())
    code, _, err = inspect(capsys, str(no_modes.path), "--tokens", str(run))
    assert code != 0 and "episode_modes" in err and len(err.strip().splitlines()) == 1
    code, _, err = inspect(capsys, str(data), "--tokens", str(run), "--token-steps", "a,b")
    assert code != 0 and "--token-steps" in err
