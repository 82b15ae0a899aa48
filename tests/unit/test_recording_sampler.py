"""The ROS-free recording core: fixed-clock sampling (watermark rule), message decoding, episode writer."""

from __future__ import annotations

import errno
import types

import cv2
import numpy as np
import pytest
import zarr

from vqbet_core.calibration import load_calibration
from vqbet_core.data.store import ZarrDataset
from vqbet_core.errors import DatasetError, VqbetError
from vqbet_core.recording import messages as M
from vqbet_core.recording.sampler import (
    RECORDING_CHECK_KEYS,
    DiskFullError,
    EpisodeWriter,
    Lazy,
    StreamSampler,
    dataset_attrs,
    stream_keys,
)
from vqbet_core.vision.preprocess import ImagePreprocess

MS = 1_000_000
T0 = 1_700_000_000_000_000_000  # a multiple of every period used here


# ---------------------------------------------------------------------- sampler
def _sampler(**kw):
    return StreamSampler(["a", "b"], control_hz=kw.pop("hz", 10), max_age=kw.pop("max_age", 0.1),
                         max_wait=kw.pop("max_wait", 0.5), **kw)


def test_ticks_on_absolute_grid_take_latest_message_at_or_before_tick():
    s = _sampler()
    for k in range(40):  # a at 100 Hz, b at 20 Hz
        s.push("a", T0 + k * 10 * MS + 3, k)
    for k in range(8):
        s.push("b", T0 + k * 50 * MS, 100 + k)
    s.start(T0 + 123 * MS)
    out = s.advance(T0 + 350 * MS)  # b has passed 350 ms, a has passed 390 ms: ticks 200 and 300 decided
    assert [t - T0 for t, _ in out] == [200 * MS, 300 * MS]
    # at 200 ms: a's message stamped 190 ms + 3 ns (200 ms + 3 ns is after the tick); b's at 200 ms exactly
    assert out[0][1] == {"a": 19, "b": 104}
    assert out[1][1] == {"a": 29, "b": 106}


def test_tick_waits_for_every_stream_then_times_out():
    s = _sampler(max_wait=0.5, max_age=0.05)
    s.push("a", T0 + 95 * MS, "a0")
    s.push("b", T0 + 99 * MS, "b0")
    s.start(T0 + 50 * MS)
    s.push("a", T0 + 120 * MS, "a1")
    assert s.advance(T0 + 130 * MS) == []  # b has not passed the 100 ms tick yet: a late b could still come
    s.push("b", T0 + 100 * MS, "b_late")  # arrives late but stamped at the tick: it must be used
    assert s.advance(T0 + 140 * MS) == []
    s.push("b", T0 + 101 * MS, "b2")
    assert s.advance(T0 + 150 * MS) == [(T0 + 100 * MS, {"a": "a0", "b": "b_late"})]
    # b goes quiet: the 200 ms tick is decided only at 200 + max_wait, with what there is (b stale -> dropped)
    s.push("a", T0 + 190 * MS, "a2")
    s.push("a", T0 + 250 * MS, "a3")
    assert s.advance(T0 + 690 * MS) == []
    assert s.advance(T0 + 700 * MS) == []
    assert s.stats.dropped == 1 and s.stats.stale == {"a": 0, "b": 1}


def test_stale_and_missing_streams_are_counted_not_written():
    s = _sampler(max_age=0.05)
    s.start(T0)
    s.push("a", T0 + 1 * MS, 1)
    out = s.advance(T0 + 2_000 * MS)  # b never arrived; a is too old after 50 ms
    assert out == [] and s.stats.samples == 0
    assert s.stats.dropped == 16 and s.stats.stale["b"] == 16 and s.stats.stale["a"] == 16


def test_episode_end_is_inclusive_and_done():
    s = _sampler()
    s.start(T0 + 1, end=T0 + 300 * MS)
    for k in range(50):
        s.push("a", T0 + k * 10 * MS, k)
        s.push("b", T0 + k * 10 * MS, -k)
    out = s.advance(T0 + 1000 * MS)
    assert [t - T0 for t, _ in out] == [100 * MS, 200 * MS, 300 * MS] and s.done
    s.stop()
    assert not s.active and s.end is None


def test_finish_decides_the_rest_with_what_there_is():
    s = _sampler()
    s.start(T0, end=T0 + 200 * MS)
    s.push("a", T0 + 150 * MS, 1)
    s.push("b", T0 + 150 * MS, 2)
    assert s.advance(T0 + 160 * MS) == []  # ticks 0 and 100 ms are decided (nothing yet: dropped), 200 waits
    assert s.stats.dropped == 2 and s.next_tick == T0 + 200 * MS
    out = s.finish()
    assert [t - T0 for t, _ in out] == [200 * MS] and s.done


def test_lazy_values_decoded_once_and_only_when_selected():
    calls = []

    def lazy(k):
        return Lazy(lambda: calls.append(k) or k)

    s = StreamSampler(["cam"], control_hz=10, max_age=0.2)
    for k in range(30):  # 30 frames in 300 ms, ticks every 100 ms: only 3 are decoded
        s.push("cam", T0 + k * 10 * MS, lazy(k))
    s.start(T0)
    out = s.advance(T0 + 290 * MS)
    assert [v["cam"] for _, v in out] == [0, 10, 20] and calls == [0, 10, 20]


def test_bad_lazy_frame_falls_back_to_previous_and_is_counted():
    def bad():
        raise M.MessageError("corrupt jpeg")

    s = StreamSampler(["cam"], control_hz=10, max_age=0.1)
    s.push("cam", T0 + 60 * MS, Lazy(lambda: "good"))
    s.push("cam", T0 + 90 * MS, Lazy(bad))
    s.push("cam", T0 + 130 * MS, Lazy(lambda: "next"))
    s.start(T0 + 1)
    out = s.advance(T0 + 140 * MS)
    assert out == [(T0 + 100 * MS, {"cam": "good"})]
    assert s.stats.bad["cam"] == 1 and "corrupt jpeg" in s.stats.last_bad


def test_pruning_does_not_depend_on_when_ticks_are_decided():
    """Live and bag decide ticks at different moments; the samples must not differ."""
    def bad():
        raise M.MessageError("bad")

    msgs = [(T0 + k * 33 * MS, (Lazy(bad) if k % 3 == 2 else k)) for k in range(60)]

    def run(step):
        s = StreamSampler(["cam"], control_hz=20, max_age=0.1, max_wait=0.2)
        s.start(T0)
        out = []
        for i, (stamp, value) in enumerate(msgs):
            s.push("cam", stamp, Lazy(value._fn) if isinstance(value, Lazy) else value)
            if i % step == 0:
                out += s.advance(stamp + 5 * MS)
        s.set_end(msgs[-1][0])
        return out + s.finish()

    a, b = run(1), run(7)
    assert [t for t, _ in a] == [t for t, _ in b] and [v for _, v in a] == [v for _, v in b]


def test_out_of_order_push_and_clock_jump():
    s = StreamSampler(["a"], control_hz=100, max_age=0.1, max_wait=0.0)
    s.push("a", T0 + 30 * MS, "late")
    s.push("a", T0 + 10 * MS, "early")
    s.start(T0)
    out = s.advance(T0 + 20 * MS)
    assert [v["a"] for _, v in out] == ["early", "early"]  # ticks 10, 20 ms: the 30 ms message is not yet due
    s.advance(T0 + 10**9 * 10**9)  # a billion seconds later: bounded work, everything counted
    assert s.stats.dropped > 10**6


def test_sampler_rejects_bad_settings():
    with pytest.raises(VqbetError, match="control_hz"):
        StreamSampler(["a"], control_hz=0, max_age=0.1)
    with pytest.raises(VqbetError, match="max_age"):
        StreamSampler(["a"], control_hz=10, max_age=0)


# ---------------------------------------------------------------------- messages
def _img(encoding, pixels, pad=0):
    h, w = pixels.shape[:2]
    c = 1 if pixels.ndim == 2 else pixels.shape[2]
    step = w * c + pad
    rows = np.zeros((h, step), np.uint8)
    rows[:, : w * c] = pixels.reshape(h, w * c)
    return types.SimpleNamespace(encoding=encoding, height=h, width=w, step=step, data=rows.tobytes(),
                                 header=types.SimpleNamespace(stamp=types.SimpleNamespace(sec=5, nanosec=7)))


RGB = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding,pixels,expected", [
    ("rgb8", RGB, RGB),
    ("bgr8", RGB[:, :, ::-1], RGB),
    ("rgba8", np.concatenate([RGB, np.full((6, 8, 1), 9, np.uint8)], 2), RGB),
    ("bgra8", np.concatenate([RGB[:, :, ::-1], np.full((6, 8, 1), 9, np.uint8)], 2), RGB),
    ("mono8", RGB[:, :, 0], np.repeat(RGB[:, :, :1], 3, 2)),
])
@pytest.mark.parametrize("pad", [0, 3])
def test_image_encodings_to_rgb(encoding, pixels, expected, pad):
    np.testing.assert_array_equal(M.image_to_rgb(_img(encoding, np.ascontiguousarray(pixels), pad)), expected)


def test_bad_images_raise_one_line_message_errors():
    msg = _img("rgb8", RGB)
    msg.data = msg.data[:-1]
    with pytest.raises(M.MessageError, match="expected step\\*height") as err:
        M.image_to_rgb(msg)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    with pytest.raises(M.MessageError, match="unsupported image encoding 'yuv422'"):
        M.image_to_rgb(_img("yuv422", RGB[:, :, :2]))
    # a fallback (cv_bridge / rosbags-image) handles other encodings
    out = M.image_to_rgb(_img("yuv422", RGB[:, :, :2]), fallback=lambda m: RGB)
    np.testing.assert_array_equal(out, RGB)
    garbage = types.SimpleNamespace(format="jpeg", data=b"\x00\x01not a jpeg")
    with pytest.raises(M.MessageError, match="neither JPEG nor PNG"):  # found by the header checks
        M.compressed_to_rgb(garbage)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_compressed_images(ext):
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, np.full_like(x, 200)], axis=2).astype(np.uint8)  # smooth: jpeg-friendly
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = M.compressed_to_rgb(types.SimpleNamespace(format=ext[1:], data=buf.tobytes()))
    if ext == ".png":
        np.testing.assert_array_equal(out, rgb)
    else:  # lossy, but the channels must not be swapped
        assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 4


def test_frame_for_dataset_uses_the_one_crop_resize():
    pre = ImagePreprocess(size=(4, 3), crop=(2, 1, 4, 4))
    frame = M.frame_for_dataset(_img("bgr8", np.ascontiguousarray(RGB[:, :, ::-1])), pre, compressed=False)
    np.testing.assert_array_equal(frame, pre.crop_resize(RGB))
    too_big = ImagePreprocess(size=(4, 3), crop=(0, 0, 100, 100))
    with pytest.raises(M.MessageError, match="does not fit"):
        M.frame_for_dataset(_img("rgb8", RGB), too_big, compressed=False)


def test_joint_mapper_by_name():
    jm = M.JointMapper(["a", "b", "c"])
    js = types.SimpleNamespace(name=["c", "a", "b", "extra"], position=[3.0, 1.0, 2.0, 9.0])
    np.testing.assert_array_equal(jm.from_joint_state(js), np.array([1, 2, 3], np.float32))
    assert jm.from_joint_state(js).dtype == np.float32
    with pytest.raises(M.MessageError, match="lacks joints \\['c'\\]"):
        jm.from_joint_state(types.SimpleNamespace(name=["a", "b"], position=[1.0, 2.0]))
    with pytest.raises(M.MessageError, match="3 joint names but 2 position values"):
        jm.from_joint_state(types.SimpleNamespace(name=["a", "b", "c"], position=[1.0, 2.0]))
    with pytest.raises(M.MessageError, match="non-finite position for joints \\['b'\\]"):
        jm.from_joint_state(types.SimpleNamespace(name=["a", "b", "c"], position=[1.0, np.nan, 2.0]))
    with pytest.raises(M.MessageError, match="duplicates"):
        jm.from_joint_state(types.SimpleNamespace(name=["a", "a", "c"], position=[1.0, 2.0, 3.0]))
    traj = types.SimpleNamespace(joint_names=["b", "c", "a"],
                                 points=[types.SimpleNamespace(positions=[2.0, 3.0, 1.0]),
                                         types.SimpleNamespace(positions=[0.0, 0.0, 0.0])])
    np.testing.assert_array_equal(jm.from_command(traj, "JointTrajectory"), [1, 2, 3])
    with pytest.raises(M.MessageError, match="no points"):
        jm.from_trajectory(types.SimpleNamespace(joint_names=["a"], points=[]))
    assert M.command_kind("trajectory_msgs/msg/JointTrajectory") == "JointTrajectory"
    with pytest.raises(M.MessageError):
        M.command_kind("std_msgs/msg/String")


def test_stamp_choice():
    msg = _img("rgb8", RGB)
    assert M.choose_stamp(msg, 5_000_000_099, "header") == 5_000_000_007
    assert M.choose_stamp(msg, 99, "receive") == 99
    with pytest.raises(M.FutureStampError):  # 5 s ahead of the receive time (tests/unit/test_clock.py)
        M.choose_stamp(msg, 99, "header")
    msg.header.stamp.sec = msg.header.stamp.nanosec = 0  # unset stamp (teleop trajectories): receive time
    assert M.choose_stamp(msg, 99, "header") == 99


# ---------------------------------------------------------------------- writer
@pytest.fixture
def attrs(tmp_path):
    (tmp_path / "cal.yaml").write_text(
        "joint_names: [a, b]\njoint_limits: {lower: -1, upper: 1, velocity: 1}\ncontrol_hz: 10\n"
        "cameras: {front: {topic: /cam, size: [4, 3]}}\n")
    cal = load_calibration(tmp_path / "cal.yaml")
    return dataset_attrs(cal, ["front"], 10.0, "test", {"max_age": 0.1})


def _step(k):
    return {"camera_front": np.full((3, 4, 3), k, np.uint8), "robot_joint": np.array([k, -k], np.float32),
            "action": np.array([2 * k, 0], np.float32)}


@pytest.mark.parametrize("background", [True, False])
def test_writer_commit_discard_and_task_labels(tmp_path, attrs, background):
    out = tmp_path / "d.zarr"
    w = EpisodeWriter(out, attrs, min_free_mb=0, stop_free_mb=0, flush_every=3, background=background)
    assert w.start(task="pick") == 0
    for k in range(7):
        w.add(T0 + k * 100 * MS, _step(k))
    assert w.episode_length == 7
    assert w.commit().length == 7
    w.start(task="junk")
    for k in range(5):
        w.add(T0 + k * 100 * MS, _step(50))
    assert w.discard().length == 3  # the two unflushed steps never reached the disk
    w.start(task="place")
    w.set_task("place it")
    for k in range(2):
        w.add(T0 + (10 + k) * 100 * MS, _step(10 + k))
    result = w.commit()
    w.close()
    assert (result.index, result.length) == (1, 2)
    ds = ZarrDataset.open(out)
    ds.validate(["camera_front", "robot_joint", "action", "timestamp"])
    assert list(ds.episode_ends) == [7, 9]
    assert ds.attrs["episode_tasks"] == ["pick", "place it"] and ds.attrs["episode_sources"] == ["", ""]
    np.testing.assert_array_equal(ds.read("robot_joint")[:, 0], [0, 1, 2, 3, 4, 5, 6, 10, 11])
    np.testing.assert_allclose(ds.read("timestamp")[7], (T0 + 1000 * MS) / 1e9)
    assert ds.array("camera_front").dtype == np.uint8 and ds.attrs["keys"] == sorted(stream_keys(["front"]) + ["timestamp"])


def test_writer_recovers_an_interrupted_episode(tmp_path, attrs):
    out = tmp_path / "d.zarr"
    w = EpisodeWriter(out, attrs, min_free_mb=0, stop_free_mb=0, flush_every=1, background=False)
    w.start("kept")
    w.add(T0, _step(1))
    w.commit()
    w.start("lost")
    for k in range(4):
        w.add(T0 + k, _step(2))
    # the process dies here: 4 uncommitted steps are on disk, and the task list already got no entry
    w2 = EpisodeWriter(out, attrs, min_free_mb=0, stop_free_mb=0, background=False)
    assert w2.recovered_steps == 4 and w2.n_episodes == 1
    ds = ZarrDataset.open(out)
    assert all(ds.array(k).shape[0] == 1 for k in ds.keys) and ds.attrs["episode_tasks"] == ["kept"]


def test_episode_lists_trimmed_after_crash_between_attrs_and_commit(tmp_path, attrs):
    out = tmp_path / "d.zarr"
    w = EpisodeWriter(out, attrs, min_free_mb=0, stop_free_mb=0, background=False)
    w.start("one")
    w.add(T0, _step(1))
    w.commit()
    w.ds.update_attrs({"episode_tasks": ["one", "two"]})  # the attrs write landed, the commit did not
    EpisodeWriter(out, attrs, min_free_mb=0, stop_free_mb=0, background=False)
    assert ZarrDataset.open(out).attrs["episode_tasks"] == ["one"]


def test_interrupted_commit_of_an_older_store_is_ignored(tmp_path, attrs):
    """Stores written before the versioned layout: zarr grew meta/episode_ends before writing the entry, and a
    kill in between left a 0 there. Readers ignore it (that episode was never committed); the next writer
    cuts it, and plain zarr then shows a valid ReplayBuffer store."""
    out = tmp_path / "d.zarr"
    w = EpisodeWriter(out, attrs, min_free_mb=0, stop_free_mb=0, background=False)
    for e in range(2):
        w.start()
        w.add(T0 + e, _step(e))
        w.commit()
    w.start()
    w.add(T0 + 5, _step(5))
    w._flush()
    w.ds.root["meta/episode_ends"].resize((3,))  # the old crash window (zarr's own append)
    assert list(zarr.open_array(str(out / "meta/episode_ends"), mode="r")[:]) == [1, 2, 0]
    assert list(ZarrDataset.open(out, mode="r").episode_ends) == [1, 2]
    w2 = EpisodeWriter(out, attrs, min_free_mb=0, stop_free_mb=0, background=False)
    assert w2.n_episodes == 2 and w2.recovered_steps == 1
    raw = zarr.open_group(str(out), mode="r", zarr_format=2)
    assert list(raw["meta/episode_ends"][:]) == [1, 2]
    assert {k: raw["data"][k].shape[0] for k in ZarrDataset.open(out).keys} == {k: 2 for k in ZarrDataset.open(out).keys}


def test_disk_checks(tmp_path, attrs):
    out = tmp_path / "d.zarr"
    w = EpisodeWriter(out, attrs, min_free_mb=1e12, stop_free_mb=0, background=False)
    with pytest.raises(DiskFullError, match="need .* MB \\(min_free_mb\\) to start an episode"):
        w.start()
    w.min_free, w.stop_free = 0, 1 << 62  # more than any disk: the first flush stops the episode
    w.flush_every = 2
    w.start("t")
    w.add(T0, _step(1))
    with pytest.raises(DiskFullError, match="disk space low"):
        w.add(T0 + 1, _step(2))
    result = w.commit(note="disk space low")
    assert (result.index, result.length) == (0, 2)
    assert ZarrDataset.open(out).attrs["episode_notes"] == ["disk space low"]


@pytest.mark.parametrize("background", [True, False])
def test_write_failure_keeps_committed_data(tmp_path, attrs, background):
    out = tmp_path / "d.zarr"
    w = EpisodeWriter(out, attrs, min_free_mb=0, stop_free_mb=0, flush_every=2, background=background)
    w.start("ok")
    w.add(T0, _step(1))
    w.commit()
    real = w.ds.append_steps
    calls = []

    def failing(batch):  # the disk fills up on the second write of this episode
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(batch)

    w.ds.append_steps = failing
    w.start("partial")
    raised = None
    try:
        for k in range(10):
            w.add(T0 + 10 + k, _step(k))
    except DiskFullError as exc:
        raised = exc
    if not background:  # the background writer reports it on a later add or at the commit
        assert raised is not None and "No space left on device" in str(raised)
    result = w.commit()
    w.close()
    assert result.length == 2 and "No space left" in result.note
    ds = ZarrDataset.open(out)
    assert list(ds.episode_ends) == [1, 3] and ds.attrs["episode_tasks"] == ["ok", "partial"]


def test_incompatible_dataset_and_shapes(tmp_path, attrs):
    out = tmp_path / "d.zarr"
    w = EpisodeWriter(out, attrs, min_free_mb=0, stop_free_mb=0, background=False)
    w.start()
    w.add(T0, _step(1))
    with pytest.raises(M.MessageError, match="does not match the episode's keys/shapes"):
        w.add(T0 + 1, {**_step(2), "camera_front": np.zeros((5, 4, 3), np.uint8)})
    w.commit()
    other = dict(attrs, joint_names=["x", "y"])
    with pytest.raises(DatasetError, match="joint_names") as err:
        EpisodeWriter(out, other, check_keys=RECORDING_CHECK_KEYS, background=False)
    assert "\n" not in str(err.value)


def test_store_appears_atomically(tmp_path, attrs):
    out = tmp_path / "sub" / "d.zarr"
    EpisodeWriter(out, attrs, background=False).close()
    assert out.exists() and not list(out.parent.glob(".d.zarr.*"))
    assert ZarrDataset.open(out).n_episodes == 0


@pytest.mark.parametrize("background", [False, True])
def test_subtask_marks_become_task_index_at_commit(tmp_path, background):
    """The operator's "done" marks label every step (hindsight), written into the open episode before it commits."""
    import zarr

    (tmp_path / "cal.yaml").write_text(
        "joint_names: [a, b]\njoint_limits: {lower: -1, upper: 1, velocity: 1}\ncontrol_hz: 10\n"
        "cameras: {front: {topic: /cam, size: [4, 3]}}\n")
    cal = load_calibration(tmp_path / "cal.yaml")
    attrs = dataset_attrs(cal, ["front"], 10.0, "test", {"max_age": 0.1, "task_names": ["kettle", "microwave"]})
    assert attrs["task_names"] == ["kettle", "microwave"] and "task_index" in attrs["keys"]
    out = tmp_path / "marks.zarr"
    w = EpisodeWriter(out, attrs, min_free_mb=0, stop_free_mb=0, flush_every=2, background=background)
    w.start()
    for k in range(7):
        w.add(k * 100_000_000, _step(k))
        if k == 2:
            w.mark(k * 100_000_000 + 50_000_000, "microwave")  # between steps 2 and 3: step 2 is the last of it
    w.mark(6 * 100_000_000, "kettle")  # at step 6's stamp (it shows the kettle done), sent after step 6 arrived
    with pytest.raises(VqbetError, match="'oven'.*expected one of"):
        w.mark(0, "oven")
    w.commit()
    w.start()  # a second episode without marks: no subtask (-1)
    for k in range(3):
        w.add(10**9 + k * 100_000_000, _step(k))
    w.commit()
    w.close()
    root = zarr.open_group(str(out), mode="r")  # plain zarr
    assert root["data/task_index"][:].tolist() == [1, 1, 1, 0, 0, 0, -1, -1, -1, -1]
    assert root["meta/episode_ends"][:].tolist() == [7, 10] and root.attrs["task_names"] == ["kettle", "microwave"]
    with pytest.raises(VqbetError, match="needs an open episode"):
        w.mark(0, "kettle")
