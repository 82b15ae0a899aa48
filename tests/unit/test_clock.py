"""The clock rule (vqbet_core.recording.clock) and the compressed-frame header checks, without ROS.

The same functions decide in policy_node (policy_inputs.JointStateMerger, camera ages), recorder_node and bag2zarr.
"""

from __future__ import annotations

import types

import cv2
import numpy as np
import pytest

from vqbet_core.recording import messages as M
from vqbet_core.recording.clock import DEFAULT_FUTURE_TOLERANCE, OffsetMeter, behind_note, input_age

NS = 1_000_000_000


def _msg(stamp_ns: int):
    return types.SimpleNamespace(header=types.SimpleNamespace(stamp=types.SimpleNamespace(
        sec=stamp_ns // NS, nanosec=stamp_ns % NS)))


def test_future_stamps_beyond_the_tolerance_are_refused():
    assert M.FUTURE_TOLERANCE_NS == int(DEFAULT_FUTURE_TOLERANCE * NS)
    recv = 100 * NS
    assert M.choose_stamp(_msg(recv - 3 * NS), recv, "header") == recv - 3 * NS  # old stamps are used (and age)
    assert M.choose_stamp(_msg(recv + M.FUTURE_TOLERANCE_NS), recv, "header") == recv + M.FUTURE_TOLERANCE_NS
    with pytest.raises(M.FutureStampError, match="5.000 s ahead") as err:
        M.choose_stamp(_msg(recv + 5 * NS), recv, "header")
    assert isinstance(err.value, M.MessageError) and "\n" not in str(err.value)
    with pytest.raises(M.FutureStampError):
        M.choose_stamp(_msg(recv + 2 * NS), recv, "header", future_tolerance_ns=NS)
    assert M.choose_stamp(_msg(recv + 5 * NS), recv, "receive") == recv  # receive mode never looks at the stamp
    assert M.choose_stamp(_msg(0), recv, "header") == recv  # unset stamp: the receive time


@pytest.mark.parametrize("offset", [5.0, -5.0, 0.0])
def test_an_offset_clock_never_extends_max_age(offset):
    """A message received at t=10 (our clock), stamped by a clock ``offset`` s away: stale after at most max_age."""
    max_age, received = 0.3, 10.0
    stamp = received + offset - 0.002  # 2 ms transport latency
    ages = [input_age(received + dt, stamp, received) for dt in (0.0, 0.29, 0.31, 6.0)]
    assert ages[2] > max_age and ages[3] > max_age  # whatever the offset: stale once max_age has passed
    assert all(a >= dt - 1e-9 for a, dt in zip(ages, (0.0, 0.29, 0.31, 6.0)))  # never younger than its arrival
    if offset < 0:  # a clock behind makes the input older (stops sooner), and says why
        assert ages[0] > max_age and "clock offset?" in behind_note(received, stamp, received, max_age)
    else:
        assert ages[1] <= max_age and behind_note(received + 0.29, stamp, received, max_age) == ""


def test_joint_state_merger_ages_use_the_receive_time():
    from vqbet_ros.policy_inputs import JointStateMerger

    m = JointStateMerger(["a", "b"])
    m.update(["a", "b"], [0.0, 0.0], stamp=15.0, received=10.0)  # stamped 5 s ahead (accepted: tolerance is the node's)
    assert m.problem(10.2, 0.3) is None
    assert "joint states are 0.400 s old" in m.problem(10.4, 0.3)  # before: age -4.6 s until t = 15.3
    m.update(["a"], [0.0], stamp=5.0, received=10.5)  # stamped 5 s behind: old at once, and the note says so
    problem = m.problem(10.5, 0.3)
    assert "(a;" in problem and "clock offset?" in problem
    assert m.age(10.5) == pytest.approx(5.5)
    m2 = JointStateMerger(["a"])
    m2.update(["a"], [1.0], stamp=3.0)  # without a receive time: the stamp (offline tools)
    assert m2.age(3.5) == pytest.approx(0.5)


def test_offset_meter_is_the_median_of_recent_messages():
    meter = OffsetMeter(window=5)
    assert meter.text() == "nan"
    for k in range(20):
        meter.add(100.0 + 0.001 * (k % 3), 100.0)
    assert meter.offset() == pytest.approx(0.001, abs=1e-9)
    for _ in range(3):  # three messages stamped 5 s ahead: the majority of the window shows it
        meter.add(105.0, 100.0)
    assert meter.offset() == pytest.approx(5.0)
    assert OffsetMeter().add(7 * NS, 10 * NS) == -3 * NS and meter.text(1.0) == "5.000"


RGB = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)


def _encoded(ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, RGB)
    assert ok
    return buf.tobytes()


def _comp(data: bytes, fmt: str = "jpeg"):
    return types.SimpleNamespace(format=fmt, data=data)


@pytest.mark.parametrize("name,make,match", [
    ("empty", lambda j, p: b"", "has no data"),
    ("garbage", lambda j, p: b"not an image at all", "neither JPEG nor PNG"),
    ("truncated jpeg", lambda j, p: j[: len(j) // 2], "truncated JPEG"),
    ("jpeg cut by one byte", lambda j, p: j[:-1], "truncated JPEG"),
    ("jpeg without frame header", lambda j, p: j[:2] + j[-2:], "broken JPEG header"),
    ("bare png", lambda j, p: p[:8], "truncated PNG"),
    ("truncated png", lambda j, p: p[:-20], "truncated PNG"),
    ("png of size 0", lambda j, p: p[:16] + b"\0" * 8 + p[24:], "PNG size 0x0"),
])
def test_corrupt_compressed_frames_fail_the_header_checks(name, make, match):
    data = make(_encoded(".jpg"), _encoded(".png"))
    with pytest.raises(M.MessageError, match=match) as err:
        M.check_compressed(_comp(data))
    assert "\n" not in str(err.value)
    with pytest.raises(M.MessageError):  # and the decoder refuses it the same way
        M.compressed_to_rgb(_comp(data))


@pytest.mark.parametrize("ext,params", [(".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".png", [])])
def test_good_frames_pass_even_with_zero_padding(ext, params):
    ok, buf = cv2.imencode(ext, RGB, params)
    data = buf.tobytes()
    for padded in (data, data + b"\0" * 100):
        M.check_compressed(_comp(padded))
        assert M.compressed_to_rgb(_comp(padded)).shape == RGB.shape
