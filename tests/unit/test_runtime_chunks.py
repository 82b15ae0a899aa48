"""Chunk blending and latency compensation (vqbet_core.runtime.chunks) and the numpy code sampler."""

import numpy as np
import pytest

from vqbet_core.chunking import ChunkAverager
from vqbet_core.errors import VqbetError
from vqbet_core.runtime.chunks import ActionChunk, blend_chunks, drop_past
from vqbet_core.runtime.sampling import choose_codes, decode_codes, sample_code

HZ = 10.0
P = 1.0 / HZ


def chunk_at(step: int, actions: np.ndarray, jitter: float = 0.0) -> ActionChunk:
    stamp = step * P + jitter
    return ActionChunk(actions, stamp + P * np.arange(len(actions)), stamp, P)


@pytest.mark.parametrize("exp_weight", [0.0, 0.5, -0.3])
def test_iterated_blend_equals_chunk_averager(exp_weight):
    """blend_chunks step by step gives ChunkAverager's action for every step (equal and exponential weights)."""
    rng = np.random.default_rng(0)
    W, A = 5, 3
    avg = ChunkAverager(W, exp_weight=exp_weight)
    blended = None
    for step in range(12):
        new = rng.standard_normal((W, A)).astype(np.float32)
        want = avg.add(new)
        blended = blend_chunks(blended, chunk_at(step, new), mode="exp" if exp_weight else "average", exp_weight=exp_weight)
        np.testing.assert_allclose(blended.actions[0], want, atol=1e-6)
        assert blended.times[0] == pytest.approx(step * P)
        # the weight behind the current point = number of chunks covering it (equal weights)
        if not exp_weight:
            assert blended.weights[0] == min(step + 1, W)


def test_average_of_three_overlapping_chunks_by_hand():
    a = chunk_at(0, np.array([[0.0], [3.0], [6.0]]))
    b = chunk_at(1, np.array([[9.0], [12.0], [15.0]]))
    c = chunk_at(2, np.array([[30.0], [60.0], [90.0]]))
    out = blend_chunks(blend_chunks(blend_chunks(None, a), b), c)
    # time 0.2: a[2]=6, b[1]=12, c[0]=30 -> 16; time 0.3: b[2]=15, c[1]=60 -> 37.5; time 0.4: c[2]=90
    np.testing.assert_allclose(out.actions[:, 0], [16.0, 37.5, 90.0])
    np.testing.assert_allclose(out.times, [0.2, 0.3, 0.4])
    np.testing.assert_allclose(out.weights, [3, 2, 1])


def test_exponential_weights_favour_newest():
    old = chunk_at(0, np.array([[0.0], [0.0]]))
    new = chunk_at(1, np.array([[1.0], [1.0]]))
    out = blend_chunks(old, new, mode="exp", exp_weight=1.0)
    w_old = np.exp(-1.0)
    assert out.actions[0, 0] == pytest.approx(1.0 / (1.0 + w_old))
    assert out.actions[1, 0] == pytest.approx(1.0)  # nothing older covers the last point


def test_overlap_matches_within_half_a_period_despite_jitter():
    a = chunk_at(0, np.array([[0.0], [2.0], [4.0]]))
    b = chunk_at(1, np.array([[10.0], [10.0], [10.0]]), jitter=0.03)  # stamp 0.13: matches a's 0.1, 0.2
    out = blend_chunks(a, b)
    np.testing.assert_allclose(out.actions[:, 0], [6.0, 7.0, 10.0])
    c = chunk_at(1, np.array([[10.0], [10.0], [10.0]]), jitter=0.06)  # times 0.16, 0.26, 0.36
    out = blend_chunks(a, c)
    # 0.16 overlaps a's 0.2 (0.04 < half a period); 0.26 is 0.06 from 0.2: no overlap
    np.testing.assert_allclose(out.actions[:, 0], [7.0, 10.0, 10.0])


def test_drop_past_keeps_the_point_being_executed():
    ch = chunk_at(0, np.arange(4, dtype=np.float32)[:, None])
    assert len(drop_past(ch, 0.05)) == 4  # still inside point 0's period
    kept = drop_past(ch, 0.1 + 0.001)  # point 0's period is over
    np.testing.assert_allclose(kept.times, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(kept.actions[:, 0], [1, 2, 3])
    assert len(drop_past(ch, 10.0)) == 0
    assert drop_past(ch, 10.0).actions.shape == (0, 1)
    # blending with an empty or fully stale previous chunk starts over
    fresh = chunk_at(5, np.ones((4, 1), np.float32))
    assert np.all(blend_chunks(drop_past(ch, 10.0), fresh).actions == 1)
    assert np.all(blend_chunks(ch, fresh).actions == 1)  # ch ends at 0.3: no overlap with 0.5..0.8


def test_bad_blend_mode_and_shapes_are_one_line_errors():
    a = chunk_at(0, np.zeros((2, 2)))
    with pytest.raises(VqbetError, match="blend mode"):
        blend_chunks(a, a, mode="median")
    with pytest.raises(VqbetError, match="action sizes differ"):
        blend_chunks(a, chunk_at(1, np.zeros((2, 3))))
    with pytest.raises(VqbetError, match="actions must be"):
        ActionChunk(np.zeros(3), np.zeros(3), 0.0, P)


def test_sampler_argmax_and_distribution():
    rng = np.random.default_rng(0)
    logits = np.array([1.0, 2.0, 0.5, -1.0])
    assert sample_code(logits, 0.0, rng) == 1
    temp = 0.7
    draws = np.array([sample_code(logits, temp, rng) for _ in range(20000)])
    p = np.exp(logits / temp) / np.exp(logits / temp).sum()
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, p, atol=0.015)
    # same seed, same draws
    a = [sample_code(logits, 1.0, np.random.default_rng(5)) for _ in range(3)]
    b = [sample_code(logits, 1.0, np.random.default_rng(5)) for _ in range(3)]
    assert a == b


def test_sequential_codes_use_the_row_of_the_sampled_primary():
    C = 3
    logits = np.array([[0.0, 50.0, 0.0], [50.0, 0.0, 0.0]])  # marginal secondary would be 0
    given = np.full((C, C), -50.0)
    given[1, 2] = 50.0  # given primary 1, secondary 2
    rng = np.random.default_rng(0)
    assert choose_codes(logits, given, 1.0, rng, sequential=True).tolist() == [1, 2]
    assert choose_codes(logits, given, 1.0, rng, sequential=False).tolist() == [1, 0]


def test_decode_is_table_plus_summed_offsets():
    C, WA = 3, 4
    table = np.arange(C * C * WA, dtype=np.float32).reshape(C, C, WA)
    offsets = np.random.default_rng(0).standard_normal((2, C, WA)).astype(np.float32)
    out = decode_codes(table, offsets, np.array([2, 1]))
    np.testing.assert_allclose(out, table[2, 1] + offsets[0, 2] + offsets[1, 1], rtol=1e-6)
    bet_table = np.arange(C * WA, dtype=np.float32).reshape(C, WA)
    np.testing.assert_allclose(decode_codes(bet_table, offsets[:1], np.array([1])), bet_table[1] + offsets[0, 1], rtol=1e-6)
