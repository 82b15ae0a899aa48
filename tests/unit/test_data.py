"""The data layer: store contract and its one-line errors, crash recovery, episode-aware windows, the
run-time history buffer matching the training windows, episode splits, normalization statistics."""

import numpy as np
import pytest
import zarr

from vqbet_core.data.normalize import STD_FLOOR, Normalizer
from vqbet_core.data.sampler import SequenceSampler, split_episodes
from vqbet_core.data.store import ZarrDataset, write_whole_frame_chunks
from vqbet_core.errors import CheckpointError, DatasetError
from vqbet_core.history import ObservationHistory


def episode(n, offset=0, dim=2):
    """Steps whose values encode their global index (offset + t), so any mix-up is visible."""
    idx = np.arange(offset, offset + n, dtype=np.float32)
    return {"state": np.repeat(idx[:, None], dim, 1), "action": np.repeat(-idx[:, None], 2, 1),
            "timestamp": np.arange(n) / 10.0}


def store(path, lengths=(3, 5, 2)):
    ds = ZarrDataset.create(path, {"source": "test"})
    offset = 0
    for n in lengths:
        ds.add_episode(episode(n, offset))
        offset += n
    return ds


def one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- store
def test_round_trip_and_layout(tmp_path):
    ds = store(tmp_path / "d.zarr")
    ro = ZarrDataset.open(tmp_path / "d.zarr", "r")
    ro.validate(["state", "action"])
    assert ro.n_episodes == 3 and ro.n_steps == 10 and ro.keys == ["action", "state", "timestamp"]
    np.testing.assert_array_equal(ro.episode_ends, [3, 8, 10])
    assert ro.episode_slices() == [slice(0, 3), slice(3, 8), slice(8, 10)]
    np.testing.assert_array_equal(ro.episode(1)["state"][:, 0], np.arange(3, 8))
    assert ro.attrs["source"] == "test" and ro.attrs["schema_version"] == 1
    # the ReplayBuffer layout in zarr format 2, readable without our code
    raw = zarr.open_group(str(ds.path), mode="r", zarr_format=2)
    assert raw["meta/episode_ends"].dtype == np.int64 and raw["data/state"].shape == (10, 2)


def test_create_refuses_an_existing_path(tmp_path):
    store(tmp_path / "d.zarr")
    with pytest.raises(DatasetError) as info:
        ZarrDataset.create(tmp_path / "d.zarr")
    one_line(info, "already exists")
    assert ZarrDataset.create(tmp_path / "d.zarr", overwrite=True).n_episodes == 0


def test_open_errors_are_one_line(tmp_path):
    with pytest.raises(DatasetError) as info:
        ZarrDataset.open(tmp_path / "nope.zarr")
    one_line(info, "nope.zarr", "not found")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError) as info:
        ZarrDataset.open(tmp_path / "plain")
    one_line(info, "not a zarr format 2 dataset")
    zarr.open_group(str(tmp_path / "nometa.zarr"), mode="w", zarr_format=2).require_group("data")
    with pytest.raises(DatasetError) as info:
        ZarrDataset.open(tmp_path / "nometa.zarr")
    one_line(info, "meta/episode_ends")


def test_validate_missing_key(tmp_path):
    ds = store(tmp_path / "d.zarr")
    with pytest.raises(DatasetError) as info:
        ds.validate(["state", "robot_joint"])
    one_line(info, "missing key data/robot_joint", "has: action, state, timestamp")


def test_validate_empty_dataset(tmp_path):
    ZarrDataset.create(tmp_path / "e.zarr")
    with pytest.raises(DatasetError) as info:
        ZarrDataset.open(tmp_path / "e.zarr").validate()
    one_line(info, "empty")


def test_arrays_of_different_lengths(tmp_path):
    ds = store(tmp_path / "d.zarr")
    with pytest.raises(DatasetError) as info:
        ds.append_steps({"state": np.zeros((3, 2), np.float32), "action": np.zeros((2, 2), np.float32),
                         "timestamp": np.zeros(3)})
    one_line(info, "different lengths")
    assert ds.pending_steps == 0 and ds.root["data/state"].shape[0] == 10  # nothing was written
    # a store whose array is shorter than episode_ends (damaged by another writer)
    ds.root["data/action"].resize((7, 2))
    with pytest.raises(DatasetError) as info:
        ZarrDataset.open(ds.path).validate()
    one_line(info, "data/action has 7 steps", "10")


@pytest.mark.parametrize("key", ["action", "state", "goal"])
def test_non_finite_values(tmp_path, key):
    ds = ZarrDataset.create(tmp_path / "d.zarr")
    ep = episode(6)
    ep["goal"] = np.ones((6, 3), np.float32)
    ep[key][4, 1] = np.inf if key == "goal" else np.nan
    ds.add_episode(ep)
    with pytest.raises(DatasetError) as info:
        ZarrDataset.open(ds.path).validate()
    one_line(info, f"data/{key}", "non-finite", "step 4")


def test_non_finite_timestamps_and_images_are_not_float_checked(tmp_path):
    ds = ZarrDataset.create(tmp_path / "d.zarr")
    ep = episode(4)
    ep["timestamp"][2] = np.nan
    ep["camera_front"] = np.zeros((4, 4, 4, 3), np.uint8)
    ds.add_episode(ep)
    ZarrDataset.open(ds.path).validate(["camera_front"])


@pytest.mark.parametrize("ends, bad", [([5, 3, 9], "entry 1 is 3"), ([4, 4, 9], "entry 1 is 4"), ([0, 3], "entry 0 is 0")])
def test_episode_ends_must_increase(tmp_path, ends, bad):
    ds = store(tmp_path / "d.zarr", lengths=(9,))
    ds.root["meta/episode_ends"].resize((len(ends),))
    ds.root["meta/episode_ends"][:] = np.array(ends, np.int64)
    for mode in ("r", "a"):
        with pytest.raises(DatasetError) as info:
            ZarrDataset.open(ds.path, mode)
        one_line(info, "strictly increasing", bad)


def test_read_only_refuses_writes(tmp_path):
    store(tmp_path / "d.zarr")
    ro = ZarrDataset.open(tmp_path / "d.zarr", "r")
    with pytest.raises(DatasetError) as info:
        ro.add_episode(episode(2))
    one_line(info, "read-only")


def test_append_shape_and_key_errors(tmp_path):
    ds = store(tmp_path / "d.zarr")
    with pytest.raises(DatasetError) as info:
        ds.append_steps({**episode(2), "state": np.zeros((2, 3), np.float32)})
    one_line(info, "data/state", "(2,)", "(3,)")
    with pytest.raises(DatasetError) as info:
        ds.append_steps({"state": np.zeros((2, 2), np.float32), "action": np.zeros((2, 2), np.float32)})
    one_line(info, "missing keys", "timestamp")
    with pytest.raises(DatasetError) as info:
        ds.append_steps({**episode(2), "goal": np.zeros((2, 1), np.float32)})
    one_line(info, "new key goal")
    with pytest.raises(DatasetError) as info:
        ds.commit_episode()
    one_line(info, "empty episode")
    ds.validate()
    assert ds.n_steps == 10 and all(ds.root["data"][k].shape[0] == 10 for k in ds.keys)


def test_first_episode_appends_must_keep_their_keys(tmp_path):
    """Bug fixed here: the first episode's later appends were not checked, so a dropped key left arrays of
    different lengths and a key added mid-episode was silently zero-filled for the earlier steps."""
    ds = ZarrDataset.create(tmp_path / "d.zarr")
    ds.append_steps({"state": np.ones((3, 2), np.float32)})
    with pytest.raises(DatasetError) as info:
        ds.append_steps({"state": np.ones((2, 2), np.float32), "action": np.ones((2, 2), np.float32)})
    one_line(info, "new ['action']")
    ds.append_steps({"state": np.ones((2, 2), np.float32)})
    ds.commit_episode()
    assert ds.keys == ["state"] and ds.n_steps == 5

    ds = ZarrDataset.create(tmp_path / "e.zarr")
    ds.append_steps({"state": np.ones((3, 2), np.float32), "action": np.ones((3, 2), np.float32)})
    with pytest.raises(DatasetError) as info:
        ds.append_steps({"state": np.ones((2, 2), np.float32)})
    one_line(info, "missing ['action']")
    # a discarded first attempt does not pin the keys of the next one
    ds.discard_episode()
    ds.add_episode({"state": np.ones((4, 2), np.float32)})
    assert ds.n_steps == 4


def test_an_uncommitted_episode_is_invisible_and_deleted_on_open_for_append(tmp_path):
    path = tmp_path / "d.zarr"
    ds = store(path, lengths=(3, 5))
    ds.append_steps(episode(4, offset=100))  # an episode that never got committed (process died)
    del ds
    ro = ZarrDataset.open(path, "r")  # readers only see committed steps and never write
    raw = zarr.open_group(str(path), mode="r", zarr_format=2)  # so does plain zarr: arrays stay 8 long
    assert ro.n_steps == 8 and all(raw["data"][k].shape[0] == 8 for k in ro.keys) and len(ro.read("state")) == 8
    ro.validate()
    ds = ZarrDataset.open(path, "a")
    assert all(ds.root["data"][k].shape[0] == 8 for k in ds.keys)
    assert ds.pending_steps == 0
    ds.add_episode(episode(2, offset=8))
    ds = ZarrDataset.open(path, "r")
    ds.validate()
    np.testing.assert_array_equal(ds.episode_ends, [3, 8, 10])
    np.testing.assert_array_equal(ds.read("state")[:, 0], np.arange(10))  # no trace of the leftover


def test_frame_chunks_are_written_exactly_as_zarr_writes_them(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (5, 12, 16, 3), dtype=np.uint8)
    frames[:, :6] = 7  # compressible half: the compressor really runs
    fast = ZarrDataset.create(tmp_path / "fast.zarr")
    fast.add_episode({"camera_front": frames, "action": np.zeros((5, 2), np.float32)})
    by_zarr = zarr.open_group(str(tmp_path / "zarr.zarr"), mode="w", zarr_format=2)
    ref = by_zarr.create_array("f", shape=frames.shape, dtype=np.uint8, chunks=(1, 12, 16, 3),
                               compressors=fast.root["data/camera_front"].metadata.compressor)
    ref[:] = frames
    for i in range(5):
        name = f"{i}.0.0.0"
        assert (tmp_path / "fast.zarr/data/camera_front" / name).read_bytes() == (tmp_path / "zarr.zarr/f" / name).read_bytes()
    again = ZarrDataset.open(tmp_path / "fast.zarr")
    np.testing.assert_array_equal(again.read("camera_front"), frames)
    # other layouts (several steps per chunk, filters, another dtype) go through zarr: False, nothing written
    low = fast.root["data/action"]
    assert not write_whole_frame_chunks(low, 5, np.zeros((1, 2), np.float32))
    assert not write_whole_frame_chunks(fast.root["data/camera_front"], 5, frames[:1].astype(np.int16))
    assert not (tmp_path / "fast.zarr/data/camera_front/5.0.0.0").exists()


def test_discard_episode(tmp_path):
    ds = store(tmp_path / "d.zarr", lengths=(3,))
    ds.append_steps(episode(2, offset=50))
    ds.append_steps(episode(3, offset=52))
    assert ds.pending_steps == 5
    assert ds.discard_episode() == 5
    assert ds.pending_steps == 0 and ds.n_episodes == 1
    assert all(ds.root["data"][k].shape[0] == 3 for k in ds.keys)
    ds.add_episode(episode(2, offset=3))
    np.testing.assert_array_equal(ds.read("state")[:, 0], np.arange(5))
    np.testing.assert_array_equal(ds.episode_ends, [3, 5])


# ---------------------------------------------------------------------------------------------- sampler
ENDS = np.array([3, 8, 10])  # episodes [0, 3), [3, 8), [8, 10)


def episode_of(step):
    return int(np.searchsorted(ENDS, step, side="right"))


def test_sampler_padding_never_crosses_episodes():
    s = SequenceSampler(ENDS, obs_window=4, action_chunk=3)
    assert len(s) == 10
    obs_idx, act_idx = s.indices(np.arange(len(s)))
    assert obs_idx.shape == (10, 4) and act_idx.shape == (10, 4, 3)
    for k in range(10):
        e = episode_of(k)
        lo, hi = ([0, *ENDS[:-1]])[e], ENDS[e] - 1
        assert obs_idx[k, -1] == k  # the current step is last
        assert ((obs_idx[k] >= lo) & (obs_idx[k] <= hi)).all()
        assert ((act_idx[k] >= lo) & (act_idx[k] <= hi)).all()
    # start of episode 1 (step 3): history repeats step 3
    np.testing.assert_array_equal(obs_idx[3], [3, 3, 3, 3])
    np.testing.assert_array_equal(obs_idx[5], [3, 3, 4, 5])
    np.testing.assert_array_equal(act_idx[5, -1], [5, 6, 7])
    # end of episode 1 (last step 7): the chunk repeats the last action
    np.testing.assert_array_equal(act_idx[7, -1], [7, 7, 7])
    np.testing.assert_array_equal(act_idx[6, -1], [6, 7, 7])
    # a two-step episode with a longer window and chunk
    np.testing.assert_array_equal(obs_idx[9], [8, 8, 8, 9])
    np.testing.assert_array_equal(act_idx[9, -1], [9, 9, 9])


def test_sampler_episode_subset_and_errors():
    s = SequenceSampler(ENDS, 2, 1, episodes=[0, 2])
    np.testing.assert_array_equal(s.steps, [0, 1, 2, 8, 9])
    obs_idx, _ = s.indices(np.arange(len(s)))
    np.testing.assert_array_equal(obs_idx[3], [8, 8])
    with pytest.raises(DatasetError):
        SequenceSampler(ENDS, 0, 1)
    with pytest.raises(DatasetError):
        SequenceSampler(ENDS, 2, 1, episodes=[])


@pytest.mark.parametrize("window", [1, 3, 6])
def test_history_buffer_matches_sampler_windows(window):
    """Run time and training must see the same padded history: that is the whole point of one padding rule."""
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(ENDS[-1], 3)).astype(np.float32)
    s = SequenceSampler(ENDS, obs_window=window, action_chunk=2)
    obs_idx, _ = s.indices(np.arange(len(s)))
    hist = ObservationHistory(window)
    starts = [0, *ENDS[:-1]]
    for e, (lo, hi) in enumerate(zip(starts, ENDS)):
        hist.reset()
        for step in range(lo, hi):  # every step, including the first `window` ones that need padding
            window_rt = hist.push(obs[step])
            np.testing.assert_array_equal(window_rt, obs[obs_idx[step]], err_msg=f"episode {e} step {step}")


def test_history_buffer_errors():
    with pytest.raises(ValueError):
        ObservationHistory(0)
    h = ObservationHistory(2)
    with pytest.raises(ValueError):
        h.stacked()
    h.push(np.zeros(3))
    with pytest.raises(ValueError):
        h.push(np.zeros(4))
    h.reset()
    assert len(h) == 0


# ---------------------------------------------------------------------------------------------- split
def test_split_by_episode():
    train, val = split_episodes(20, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18
    assert set(train) | set(val) == set(range(20)) and not set(train) & set(val)
    t2, v2 = split_episodes(20, 0.1, seed=3)
    np.testing.assert_array_equal(val, v2)
    assert not np.array_equal(split_episodes(20, 0.5, seed=4)[1], split_episodes(20, 0.5, seed=5)[1])
    assert len(split_episodes(3, 0.01)[1]) == 1  # at least one validation episode when asked for any
    assert len(split_episodes(2, 0.9)[0]) == 1  # and at least one training episode
    assert len(split_episodes(1, 0.5)[1]) == 0 and len(split_episodes(5, 0.0)[1]) == 0
    with pytest.raises(DatasetError):
        split_episodes(0, 0.1)
    # split episodes feed the sampler: no training window contains a validation step
    s = SequenceSampler(ENDS, 3, 2, episodes=[0, 2])
    obs_idx, act_idx = s.indices(np.arange(len(s)))
    assert not np.isin(obs_idx, np.arange(3, 8)).any() and not np.isin(act_idx, np.arange(3, 8)).any()


# ---------------------------------------------------------------------------------------------- normalize
def test_normalizer_round_trip_and_flat_form():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(500, 3)).astype(np.float32)
    x[:, 2] = 7.0  # a constant feature stays finite
    a = rng.uniform(-1, 1, size=(500, 2)).astype(np.float32)
    norm = Normalizer.fit({"state": x, "action": a})
    z = norm.normalize("state", x)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(0), 1, atol=1e-4)
    assert norm.stats["state"]["std"][2] == np.float32(STD_FLOOR)
    np.testing.assert_allclose(norm.unnormalize("state", z), x, atol=1e-5)
    np.testing.assert_allclose(norm.unnormalize("action", norm.normalize("action", a)), a, atol=1e-6)

    flat = norm.to_flat()
    assert set(flat) == {"state.mean", "state.std", "action.mean", "action.std"}
    again = Normalizer.from_flat(flat)
    for key in ("state", "action"):
        for stat in ("mean", "std"):
            np.testing.assert_array_equal(again.stats[key][stat], norm.stats[key][stat])
    np.testing.assert_array_equal(again.normalize("state", x), z)
    # a dotted key name survives the flat form
    dotted = Normalizer.from_flat(Normalizer.fit({"obs.state": x}).to_flat())
    assert list(dotted.stats) == ["obs.state"]


def test_normalizer_errors():
    norm = Normalizer.fit({"state": np.zeros((4, 2))})
    with pytest.raises(CheckpointError) as info:
        norm.normalize("action", np.zeros(2))
    one_line(info, "'action'", "state")
    with pytest.raises(CheckpointError) as info:
        Normalizer.from_flat({"state.mean": np.zeros(2)})
    one_line(info, "'state'", "mean and std")
