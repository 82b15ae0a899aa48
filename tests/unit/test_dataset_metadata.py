"""Issue 24 item 4: `vqbet train` / `vqbet export` say in one line what robot metadata the dataset lacks and
what they use instead; --joint-names / --control-hz set it (kept in the checkpoint and model.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from vqbet_core.cli.main import main as vqbet
from vqbet_core.data.metadata import check_metadata, parse_control_hz, parse_joint_names
from vqbet_core.data.store import ZarrDataset
from vqbet_core.errors import VqbetError

sys.path.insert(0, str(Path(__file__).parent))
from test_train import two_mode_dataset  # noqa: E402

TINY = ["gpt.n_layer=1", "gpt.n_head=2", "gpt.n_embd=32", "vq.code_dim=16", "vq.hidden=32", "vq.n_codes=4",
        "heads.hidden=32", "train.phase1_steps=10", "train.phase2_steps=4", "train.batch_size=16",
        "train.phase1_batch_size=32", "train.log_every=5", "train.val_every=4", "train.ckpt_every=4", "train.device=cpu"]


def warnings_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def test_missing_metadata_is_named_with_what_is_used_instead():
    overrides, warning = check_metadata({}, action_key="action", action_dim=3, image_keys=["camera_front"])
    assert overrides == {} and "\n" not in warning
    for needle in ("joint_names", "action_0..action_2", "control_hz", "10 Hz", "cameras.front", "no crop",
                   "--joint-names", "--control-hz", "docs/reference/dataset-format.md"):
        assert needle in warning, (needle, warning)
    full = {"joint_names": ["a", "b", "c"], "control_hz": 30.0, "cameras": {"front": {"preprocess": {"size": [4, 4]}}}}
    assert check_metadata(full, action_key="action", action_dim=3, image_keys=["camera_front"]) == ({}, None)
    # names of another size are as good as none
    _, warning = check_metadata({**full, "joint_names": ["a", "b"]}, action_key="action", action_dim=3)
    assert "joint_names of the action size (3" in warning and "control_hz" not in warning
    # the options fill the gaps silently, and say so when they replace the dataset's values
    assert check_metadata({}, action_key="action", action_dim=2, joint_names=["x", "y"], control_hz=20.0) == (
        {"joint_names": ["x", "y"], "control_hz": 20.0}, None)
    _, warning = check_metadata(full, action_key="action", action_dim=3, joint_names=["x", "y", "z"])
    assert "replace" in warning and "['a', 'b', 'c']" in warning


@pytest.mark.parametrize("text, needle", [("a,,b", "comma-separated"), ("a,b,a", "a given more than once")])
def test_bad_joint_names_are_one_line_errors(text, needle):
    with pytest.raises(VqbetError, match=needle):
        parse_joint_names(text)
    with pytest.raises(VqbetError, match="gives 2 names but data/action has 3"):
        check_metadata({}, action_key="action", action_dim=3, joint_names=["a", "b"])
    for bad in ("0", "-5", "nan", "fast"):
        with pytest.raises(VqbetError, match="positive rate"):
            parse_control_hz(bad)


def test_train_and_export_warn_and_the_options_reach_model_yaml(tmp_path, capsys):
    data = two_mode_dataset(tmp_path / "plain.zarr", episodes=6, length=20)  # no joint_names, no control_hz
    assert "joint_names" not in ZarrDataset.open(data).attrs
    base = ["train", "--config", "multipath", "--data", str(data), "--no-progress"]
    tiny = [arg for s in TINY for arg in ("--set", s)]

    assert vqbet(base + ["--out", str(tmp_path / "plain")] + tiny) == 0
    lines = warnings_of(capsys)
    assert len(lines) == 1 and "joint_names" in lines[0] and "control_hz" in lines[0], lines

    assert vqbet(base + ["--out", str(tmp_path / "named"), "--joint-names", "x,y", "--control-hz", "20"] + tiny) == 0
    assert warnings_of(capsys) == []
    meta = yaml.safe_load((tmp_path / "named/checkpoint/meta.yaml").read_text())
    assert meta["dataset_attrs"]["joint_names"] == ["x", "y"] and meta["dataset_attrs"]["control_hz"] == 20.0

    assert vqbet(["train", "--config", "multipath", "--data", str(data), "--out", str(tmp_path / "bad"),
                  "--joint-names", "x,y,z"] + tiny) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--joint-names gives 3 names but data/action has 2" in err[0]

    # export: the named run exports silently with its names; the plain one warns, and the options fix it
    assert vqbet(["export", "--checkpoint", str(tmp_path / "named"), "--out", str(tmp_path / "m1")]) == 0
    assert warnings_of(capsys) == []
    model = yaml.safe_load((tmp_path / "m1/model.yaml").read_text())
    assert model["joint_names"] == ["x", "y"] and model["control_hz"] == 20.0

    assert vqbet(["export", "--checkpoint", str(tmp_path / "plain"), "--out", str(tmp_path / "m2")]) == 0
    lines = warnings_of(capsys)
    assert len(lines) == 1 and "the training data has no joint_names, control_hz" in lines[0], lines
    assert yaml.safe_load((tmp_path / "m2/model.yaml").read_text())["joint_names"] == ["action_0", "action_1"]

    assert vqbet(["export", "--checkpoint", str(tmp_path / "plain"), "--out", str(tmp_path / "m3"),
                  "--joint-names", "j1,j2", "--control-hz", "15"]) == 0
    assert warnings_of(capsys) == []
    model = yaml.safe_load((tmp_path / "m3/model.yaml").read_text())
    assert model["joint_names"] == ["j1", "j2"] and model["control_hz"] == 15.0
    assert model["joint_names_source"] == "vqbet export --joint-names"
    assert model["control_hz_source"] == "vqbet export --control-hz"
