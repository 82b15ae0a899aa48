"""``vqbet bag2zarr`` on bags written here with ``rosbags`` (sqlite3 and mcap, raw and compressed images,
shuffled joint order, JointState and JointTrajectory commands), checked against an independent reference
of the sampling rule. (The comparison with the live recorder on the same streams is in tests/ros.)"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from vqbet_core.calibration import load_calibration
from vqbet_core.cli.main import main as vqbet
from vqbet_core.data.store import ZarrDataset

rosbags = pytest.importorskip("rosbags")
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

TS = get_typestore(Stores.ROS2_JAZZY)
T = TS.types
MS = 1_000_000
T0 = 1_700_000_000_000_000_000
JOINTS = ["j_a", "j_b", "j_c"]
CAL = """\
robot: testbot
control_hz: 10
joint_names: [j_a, j_b, j_c]
joint_limits: {lower: -10, upper: 10, velocity: 1}
cameras:
  front: {topic: /camera/image_raw, size: [16, 12], crop: [8, 0, 48, 48]}
  wrist: {topic: /wrist/image/compressed, compressed: true, size: [16, 12]}
"""


def _header(ns):
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9), frame_id="")


def frame(seq):
    y, x = np.mgrid[0:48, 0:64]
    return ((np.stack([x * 3, y * 5, x + y], axis=2) + seq) % 256).astype(np.uint8)


def joint_values(seq):
    return seq * 0.5 + np.arange(3, dtype=np.float64)


def command_values(seq):
    return -seq * 0.25 - np.arange(3, dtype=np.float64)


def _jointstate(stamp, values, rng):
    perm = rng.permutation(3)
    return T["sensor_msgs/msg/JointState"](header=_header(stamp), name=[JOINTS[i] for i in perm],
                                           position=values[perm], velocity=np.zeros(0), effort=np.zeros(0))


def _trajectory(values, rng):
    perm = rng.permutation(3)
    point = T["trajectory_msgs/msg/JointTrajectoryPoint"](
        positions=values[perm], velocities=np.zeros(0), accelerations=np.zeros(0), effort=np.zeros(0),
        time_from_start=T["builtin_interfaces/msg/Duration"](sec=0, nanosec=0))
    return T["trajectory_msgs/msg/JointTrajectory"](header=_header(0), joint_names=[JOINTS[i] for i in perm], points=[point])


def write_bag(path: Path, storage: str, seconds: float = 2.0, command: str = "JointTrajectory", t0: int = T0,
              markers=(), skip_topics=(), bad_joint_every: int = 0, seed: int = 0, bad_png_every: int = 0,
              camera_lag_ns: int = 2 * MS, future_joint_every: int = 0, subtask_marks=()):
    """A bag like ``ros2 bag record`` writes: log time = stamp + a small transport latency.

    Returns {stream: [(stamp used for sampling, seq)]} of the good messages, for the reference."""
    rng = np.random.default_rng(seed)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    events, used = [], {"camera_front": [], "camera_wrist": [], "robot_joint": [], "action": []}
    n_cam, n_js = int(seconds * 30), int(seconds * 100)
    for k in range(n_cam):
        stamp = t0 + k * 33_333_333 + 7
        bgr = np.ascontiguousarray(frame(k)[:, :, ::-1])
        img = T["sensor_msgs/msg/Image"](header=_header(stamp), height=48, width=64, encoding="bgr8",
                                         is_bigendian=0, step=192, data=bgr.reshape(-1))
        events.append((stamp + camera_lag_ns, "/camera/image_raw", "sensor_msgs/msg/Image", img))
        used["camera_front"].append((stamp, k))
        ok, png = cv2.imencode(".png", bgr)
        if bad_png_every and k % bad_png_every == bad_png_every - 1:
            png = np.frombuffer(b"not a png", np.uint8)  # fails the header checks on arrival
        else:
            used["camera_wrist"].append((stamp + 1000, k))
        comp = T["sensor_msgs/msg/CompressedImage"](header=_header(stamp + 1000), format="png", data=png.reshape(-1))
        events.append((stamp + 3 * MS, "/wrist/image/compressed", "sensor_msgs/msg/CompressedImage", comp))
        log = stamp + 1 * MS
        if command == "JointTrajectory":  # header stamp 0: sampled by its log (receive) time
            events.append((log, "/teleop/joint_command", "trajectory_msgs/msg/JointTrajectory", _trajectory(command_values(k), rng)))
            used["action"].append((log, k))
        else:
            events.append((log, "/teleop/joint_command", "sensor_msgs/msg/JointState", _jointstate(stamp, command_values(k), rng)))
            used["action"].append((stamp, k))
    for k in range(n_js):
        stamp = t0 + k * 10 * MS + 11
        values = joint_values(k)
        bad = bad_joint_every and k % bad_joint_every == bad_joint_every - 1
        if bad:
            values = values.copy()
            values[1] = np.nan
        future = future_joint_every and k % future_joint_every == future_joint_every - 1
        header_stamp = stamp + 5_000 * MS if future else stamp  # a sender clock 5 s ahead: refused, counted
        events.append((stamp + MS // 2, "/joint_states", "sensor_msgs/msg/JointState", _jointstate(header_stamp, values, rng)))
        if not bad and not future:
            used["robot_joint"].append((stamp, k))
    for log, text in markers:
        events.append((log, "/episode", "std_msgs/msg/String", T["std_msgs/msg/String"](data=text)))
    for log, text in subtask_marks:  # the recorder's ~/subtask_done, as ros2 bag record keeps it
        events.append((log, "/recorder_node/subtask_done", "std_msgs/msg/String", T["std_msgs/msg/String"](data=text)))
    events.sort(key=lambda e: e[0])
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for log, topic, msgtype, msg in events:
            if topic in skip_topics:
                continue
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=TS)
            writer.write(conns[topic], log, TS.serialize_cdr(msg, msgtype))
    return used


def reference(used, ticks_ns, max_age_ns=100 * MS):
    """The sampling rule, written independently: latest message at or before the tick, at most max_age old."""
    rows = {}
    for stream, items in used.items():
        stamps = np.array([s for s, _ in items])
        seqs = [k for _, k in items]
        picked = []
        for t in ticks_ns:
            j = int(np.searchsorted(stamps, t, side="right")) - 1
            picked.append(seqs[j] if j >= 0 and t - stamps[j] <= max_age_ns else None)
        rows[stream] = picked
    keep = [i for i in range(len(ticks_ns)) if all(rows[s][i] is not None for s in rows)]
    return keep, rows


@pytest.fixture
def cal(tmp_path):
    path = tmp_path / "cal.yaml"
    path.write_text(CAL)
    return path


def _run(*args):
    return vqbet(["bag2zarr", *map(str, args), "--no-progress", "--min-free-mb", "1"])


@pytest.mark.parametrize("storage,command", [("mcap", "JointTrajectory"), ("sqlite3", "JointState")])
def test_bag_matches_the_sampling_rule(tmp_path, cal, storage, command, capsys):
    used = write_bag(tmp_path / "bag", storage, command=command, bad_joint_every=13)
    out = tmp_path / "d.zarr"
    assert _run(tmp_path / "bag", "--calibration", cal, "--out", out) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] and report["bad"]["robot_joint"] == 200 // 13
    _check_against_reference(tmp_path, cal, out, used)


def test_future_stamps_and_corrupt_frames_are_counted_and_not_used(tmp_path, cal, capsys):
    """Issue 24 (clock rule, bad frames on arrival): joint states stamped 5 s ahead of their log time and PNGs
    that are no PNG are each counted exactly, whether a tick would select them or not, and never stored."""
    used = write_bag(tmp_path / "bag", "sqlite3", command="JointState", future_joint_every=7, bad_png_every=4)
    out = tmp_path / "d.zarr"
    assert _run(tmp_path / "bag", "--calibration", cal, "--out", out) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] and report["bad"] == {"robot_joint": 200 // 7, "camera_wrist": 60 // 4}, report
    _check_against_reference(tmp_path, cal, out, used)
    # a tolerance above the offset accepts them: then only the PNGs are bad
    assert _run(tmp_path / "bag", "--calibration", cal, "--out", tmp_path / "e.zarr", "--future-tolerance", "6") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bad"] == {"camera_wrist": 60 // 4}, report
    assert _run(tmp_path / "bag", "--calibration", cal, "--out", tmp_path / "f.zarr", "--future-tolerance", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--future-tolerance must be >= 0" in err[0], err


def _check_against_reference(tmp_path, cal, out, used):
    ds = ZarrDataset.open(out)
    ds.validate(["camera_front", "camera_wrist", "robot_joint", "action", "timestamp"])
    assert ds.n_episodes == 1 and ds.attrs["source"] == "bag2zarr"
    assert ds.attrs["episode_sources"] == [f"{(tmp_path / 'bag').resolve()}#0"]
    ticks = np.round(ds.read("timestamp") * 10).astype(np.int64) * 100 * MS
    # whole-bag episode: every grid tick from the first to the last message (10 Hz, 2 s)
    first_log = T0 + 1 * MS + 7
    all_ticks = np.arange(-(-first_log // (100 * MS)) * 100 * MS, T0 + 2000 * MS, 100 * MS)
    keep, rows = reference(used, all_ticks)
    np.testing.assert_array_equal(ticks, all_ticks[keep])
    pre = load_calibration(cal).cameras
    for i, row in enumerate(keep):
        np.testing.assert_array_equal(ds.read("robot_joint")[i], joint_values(rows["robot_joint"][row]).astype(np.float32))
        np.testing.assert_array_equal(ds.read("action")[i], command_values(rows["action"][row]).astype(np.float32))
        for cam in ("front", "wrist"):
            want = pre[cam].preprocess.crop_resize(frame(rows[f"camera_{cam}"][row]))
            np.testing.assert_array_equal(ds.read(f"camera_{cam}")[i], want)


def test_markers_split_episodes_append_and_skip(tmp_path, cal, capsys):
    markers = [(T0 + 200 * MS, "start pick the cup"), (T0 + 700 * MS, "end"),
               (T0 + 800 * MS, "start junk"), (T0 + 900 * MS, "discard"),
               (T0 + 1_000 * MS, json.dumps({"event": "start", "stamp_ns": T0 + 1_050 * MS, "task": "place"})),
               (T0 + 1_500 * MS, json.dumps({"event": "end", "stamp_ns": T0 + 1_420 * MS})),
               (T0 + 1_800 * MS, "start never ended")]
    write_bag(tmp_path / "a", "mcap", markers=markers)
    out = tmp_path / "d.zarr"
    assert _run(tmp_path / "a", "--calibration", cal, "--out", out, "--episode-topic", "/episode") == 0
    ds = ZarrDataset.open(out)
    assert ds.attrs["episode_tasks"] == ["pick the cup", "place"]
    ticks = [np.round(ds.episode(i, ["timestamp"])["timestamp"] * 10).astype(int) - T0 // (100 * MS) for i in range(2)]
    assert list(ticks[0]) == [2, 3, 4, 5, 6, 7] and list(ticks[1]) == [11, 12, 13, 14]
    # again: nothing new; with a second bag (different recording): appended
    capsys.readouterr()
    assert _run(tmp_path / "a", "--calibration", cal, "--out", out, "--episode-topic", "/episode") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["skipped"] == 2
    write_bag(tmp_path / "b", "sqlite3", t0=T0 + 10**10, markers=[(T0 + 10**10 + 100 * MS, "start again"),
                                                                  (T0 + 10**10 + 400 * MS, "end")])
    assert _run(tmp_path / "a", tmp_path / "b", "--calibration", cal, "--out", out, "--episode-topic", "/episode") == 0
    ds = ZarrDataset.open(out)
    assert ds.n_episodes == 3 and ds.attrs["episode_tasks"] == ["pick the cup", "place", "again"]


def test_missing_topic_and_corrupt_bags_one_line_each(tmp_path, cal, capsys):
    write_bag(tmp_path / "good", "sqlite3", seconds=1.0)
    write_bag(tmp_path / "nojoints", "mcap", seconds=1.0, skip_topics=("/joint_states",))
    write_bag(tmp_path / "truncated", "mcap", seconds=1.0)
    mcap = next((tmp_path / "truncated").glob("*.mcap"))
    data = mcap.read_bytes()
    mcap.write_bytes(data[: len(data) * 2 // 3])
    write_bag(tmp_path / "corrupt", "sqlite3", seconds=1.0)
    db = next((tmp_path / "corrupt").glob("*.db3"))
    raw = bytearray(db.read_bytes())
    raw[100:4000] = b"\xff" * 3900
    db.write_bytes(bytes(raw))
    out = tmp_path / "d.zarr"
    rc = _run(tmp_path / "good", tmp_path / "nojoints", tmp_path / "truncated", tmp_path / "corrupt",
              tmp_path / "missing", "--calibration", cal, "--out", out)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2
    assert any("nojoints" in e and "topic /joint_states not found" in e for e in err), err
    assert any("truncated" in e for e in err) and any("corrupt" in e for e in err), err
    assert any("missing: not found" in e for e in err), err
    assert len(err) == 4
    ds = ZarrDataset.open(out)  # the good bag's episode (and what was readable of the truncated one) stays
    assert ds.n_episodes >= 1 and ds.attrs["episode_sources"][0].endswith("good#0")
    ds.validate(["robot_joint"])


def test_user_errors(tmp_path, cal, capsys):
    write_bag(tmp_path / "bag", "mcap", seconds=0.5)
    assert _run(tmp_path / "bag", "--calibration", cal, "--out", tmp_path / "d.zarr", "--camera", "front") == 2
    assert "--camera 'front': expected NAME=TOPIC" in capsys.readouterr().err
    assert _run(tmp_path / "bag", "--calibration", cal, "--out", tmp_path / "d.zarr", "--command", "/camera/image_raw") == 2
    assert "has type sensor_msgs/msg/Image, expected" in capsys.readouterr().err
    assert _run(tmp_path / "bag", "--calibration", cal, "--out", tmp_path / "d.zarr") == 0
    other = tmp_path / "other.yaml"
    other.write_text(CAL.replace("j_c]", "j_x]"))
    assert _run(tmp_path / "bag", "--calibration", other, "--out", tmp_path / "d.zarr") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "joint_names" in err[0] and "use a new output path" in err[0]


def test_progress_bar_and_full_frames(tmp_path, cal, capsys):
    write_bag(tmp_path / "bag", "mcap", seconds=0.5)
    rc = vqbet(["bag2zarr", str(tmp_path / "bag"), "--calibration", str(cal), "--out", str(tmp_path / "d.zarr"),
                "--no-preprocess", "--min-free-mb", "1"])
    assert rc == 0 and "bag2zarr" in capsys.readouterr().err
    ds = ZarrDataset.open(tmp_path / "d.zarr")
    assert ds.array("camera_front").shape[1:] == (48, 64, 3)
    assert ds.attrs["cameras"]["front"]["preprocess"] is None


def _convert(tmp_path, name, bag, cal, workers, log=None, **kw):
    from vqbet_core.recording.bag2zarr import BagOptions, convert_bags

    out = tmp_path / f"{name}.zarr"
    options = BagOptions(workers=workers, segment_seconds=0.3, min_free_mb=1, **kw)
    reports = convert_bags([bag], load_calibration(cal), out, options, progress=False, log=log or (lambda line: None))
    return reports[0], ZarrDataset.open(out)


def _same_dataset(a, b):
    assert a.keys == b.keys
    for key in a.keys:
        np.testing.assert_array_equal(a.read(key), b.read(key))
    for attr in ("episode_ends", "episode_tasks", "episode_sources", "episode_notes"):
        assert a.attrs.get(attr) == b.attrs.get(attr), attr


def test_parallel_segments_give_the_single_pass_dataset(tmp_path, cal):
    """Two worker processes on 0.3 s segments: the same arrays, episodes and counts as one pass, with bad
    joint states and PNGs that fail only when selected (counted once though two segments may read them)."""
    markers = [(T0 + 150 * MS, "start pick"), (T0 + 1_650 * MS, "end"), (T0 + 1_700 * MS, "start junk"),
               (T0 + 1_750 * MS, "discard"), (T0 + 1_900 * MS, "start place"), (T0 + 2_950 * MS, "end")]
    write_bag(tmp_path / "bag", "mcap", seconds=3.0, markers=markers, bad_joint_every=13, bad_png_every=4)
    # max_age 40 ms: a tick whose 30 Hz frame failed falls back to the one before, or is dropped
    one, ds1 = _convert(tmp_path, "one", tmp_path / "bag", cal, 1, episode_topic="/episode", max_age=0.04)
    par, ds2 = _convert(tmp_path, "par", tmp_path / "bag", cal, 2, episode_topic="/episode", max_age=0.04)
    assert one.episodes == par.episodes and len(one.episodes) == 2 and one.error == par.error == ""
    assert (one.dropped, one.stale, one.bad, one.bytes_read) == (par.dropped, par.stale, par.bad, par.bytes_read)
    assert one.bad["robot_joint"] == 300 // 13 and one.bad["camera_wrist"] > 0 and one.dropped > 0
    _same_dataset(ds1, ds2)


def test_parallel_falls_back_to_one_pass_on_skewed_stamps(tmp_path, cal):
    """A camera logged 0.4 s after its header stamps (beyond the segments' 0.25 s margin): one pass, said once."""
    write_bag(tmp_path / "bag", "sqlite3", seconds=2.0, camera_lag_ns=400 * MS)
    lines = []
    one, ds1 = _convert(tmp_path, "one", tmp_path / "bag", cal, 1)
    par, ds2 = _convert(tmp_path, "par", tmp_path / "bag", cal, 2, log=lines.append)
    assert [line for line in lines if "converting in one pass" in line] == [line for line in lines if line]
    assert len(lines) == 1 and one.episodes == par.episodes and one.skipped == par.skipped == 0
    _same_dataset(ds1, ds2)


SUBTASKS = ["reach", "grasp", "place"]


def _expected_task_index(ticks, marks):
    """The recorder's rule, written independently: a step belongs to the first mark stamped after it (-1: none)."""
    out = []
    for t in ticks:
        later = [name for stamp, name in sorted(marks) if t < stamp]
        out.append(SUBTASKS.index(later[0]) if later else -1)
    return np.array(out, np.int64)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_subtask_marks_reproduce_task_index(tmp_path, cal, capsys, workers):
    """Issue 25: the "subtask done" marks of a bag (the recorder's ~/subtask_done: plain names stamped with their
    log time, JSON with a stamp) give data/task_index, per episode window, in a single pass and in segments."""
    grasp_stamp = T0 + 1_200 * MS  # a tick's time exactly: the step at it already belongs to the next subtask
    subtask_marks = [(T0 + 650 * MS + 3, "reach"),
                     (T0 + 1_230 * MS, json.dumps({"task": "grasp", "stamp": grasp_stamp / 1e9})),
                     (T0 + 1_300 * MS, json.dumps({"task": "place", "stamp": (T0 + 9_000 * MS) / 1e9})),  # 7.7 s ahead
                     (T0 + 1_310 * MS, "{broken")]
    write_bag(tmp_path / "bag", "mcap", subtask_marks=subtask_marks)
    out = tmp_path / "d.zarr"
    assert _run(tmp_path / "bag", "--calibration", cal, "--out", out, "--subtask-topic", "/recorder_node/subtask_done",
                "--task-names", ",".join(SUBTASKS), "--workers", workers) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] and report["bad"] == {"/recorder_node/subtask_done": 2}, report  # the future and the broken one
    import zarr

    g = zarr.open_group(str(out), mode="r")  # plain zarr: what any reader of the dataset sees
    assert list(g.attrs["task_names"]) == SUBTASKS
    ticks = np.round(g["data/timestamp"][:] * 10).astype(np.int64) * 100 * MS
    ti = g["data/task_index"][:]
    want = _expected_task_index(ticks, [(T0 + 650 * MS + 3, "reach"), (grasp_stamp, "grasp")])
    np.testing.assert_array_equal(ti, want)
    assert set(ti.tolist()) == {-1, 0, 1} and ti[list(ticks).index(grasp_stamp)] == -1


def test_subtask_marks_follow_episode_windows_and_unknown_names_fail(tmp_path, cal, capsys):
    markers = [(T0 + 200 * MS, "start one"), (T0 + 900 * MS, "end"), (T0 + 1_000 * MS, "start two"), (T0 + 1_900 * MS, "end")]
    marks = [(T0 + 500 * MS + 1, "reach"), (T0 + 1_400 * MS + 1, json.dumps({"task": "place", "stamp_ns": T0 + 1_500 * MS}))]
    write_bag(tmp_path / "a", "sqlite3", markers=markers, subtask_marks=marks)
    out = tmp_path / "d.zarr"
    args = ["--calibration", cal, "--episode-topic", "/episode", "--subtask-topic", "/recorder_node/subtask_done",
            "--task-names", ",".join(SUBTASKS), "--workers", "1"]
    assert _run(tmp_path / "a", "--out", out, *args) == 0
    ds = ZarrDataset.open(out)
    assert ds.n_episodes == 2
    for i, (stamp, name) in enumerate([(T0 + 500 * MS + 1, "reach"), (T0 + 1_500 * MS, "place")]):
        ep = ds.episode(i, ["timestamp", "task_index"])
        ticks = np.round(ep["timestamp"] * 10).astype(np.int64) * 100 * MS
        np.testing.assert_array_equal(ep["task_index"], _expected_task_index(ticks, [(stamp, name)]))
        assert (ep["task_index"] == SUBTASKS.index(name)).sum() >= 3
    # a mark outside --task-names: one line naming it, the bag is not converted
    write_bag(tmp_path / "b", "sqlite3", markers=markers, subtask_marks=marks + [(T0 + 600 * MS, "wave")])
    capsys.readouterr()
    assert _run(tmp_path / "b", "--out", tmp_path / "e.zarr", *args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "['wave']" in err[0] and "not in --task-names" in err[0], err
    assert ZarrDataset.open(tmp_path / "e.zarr").n_episodes == 0
    # --subtask-topic without --task-names
    assert _run(tmp_path / "a", "--out", tmp_path / "f.zarr", "--calibration", cal,
                "--subtask-topic", "/recorder_node/subtask_done") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--subtask-topic needs --task-names" in err[0], err
