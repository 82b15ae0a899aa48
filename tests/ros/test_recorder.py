"""recorder_node over real DDS (loopback, private domain) against a fake robot publisher process.

One recording session (module fixture) drives the node through its services, its ``~/task`` topic, the
keyboard helper and a clean shutdown while this test process records the same topics into bags; the
tests then check the dataset against what was published (values and order, by the publisher's log),
and ``vqbet bag2zarr`` of those bags (mcap and sqlite3) against the recorder's dataset.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")

sys.path.insert(0, str(Path(__file__).parent))
import _recorder_support as S  # noqa: E402

from vqbet_core.calibration import load_calibration  # noqa: E402
from vqbet_core.data.store import ZarrDataset  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]
NS = "/robot1"
RECORDER = f"{NS}/recorder_node"
SHIPPED_YAML = S.REPO / "ros2_ws/src/vqbet_bringup/config/recorder.yaml"
DDS_PROFILE = S.REPO / "ros2_ws/src/vqbet_bringup/config/fastdds_large_images.xml"
TEST_YAML = """\
/**/recorder_node:
  ros__parameters:
    task: first
    max_wait: 3.0
    status_period: 0.2
    image_qos:
      reliability: reliable
      depth: 200
    state_qos:
      depth: 2000
"""


def _keyboard_session(procs, client, lines_with_pauses):
    """Run record_keyboard with piped input; returns its output lines. Spins the client meanwhile."""
    proc = subprocess.Popen([sys.executable, "-m", "vqbet_ros.record_keyboard", "--ros-args", "-p", f"recorder:={RECORDER}"],
                            env=procs.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    procs.procs.append(proc)
    out: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [out.put(line.rstrip()) for line in proc.stdout], daemon=True).start()
    seen = []

    def wait_for(prefix, timeout=30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = out.get_nowait()
                seen.append(line)
                if line.startswith(prefix):
                    return
            except queue.Empty:
                client.spin(0.05)
        raise AssertionError(f"record_keyboard never printed {prefix!r}; output: {seen}")

    for line, expect, pause in lines_with_pauses:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        if expect:
            wait_for(expect)
        client.spin(pause)
    proc.stdin.write("q\n")
    proc.stdin.close()
    proc.wait(15)
    return seen


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recorder")
    env = S.ros_env()
    cal = S.write_calibration(tmp)
    (tmp / "test.yaml").write_text(TEST_YAML)
    out = tmp / "live.zarr"
    procs = S.Procs(env, tmp)
    client = None
    result = {"tmp": tmp, "cal": cal, "out": out, "responses": {}}
    try:
        fake = procs.start("fake", S.fake_streams_args(tmp / "pub.jsonl", extra=["--bad-every", "9"]))
        args = ["-m", "vqbet_ros.recorder_node", "--ros-args", "-r", f"__ns:={NS}",
                "--params-file", str(SHIPPED_YAML), "--params-file", str(tmp / "test.yaml"),
                "-p", f"output:={out}", "-p", f"calibration:={cal}", "-p", "min_free_mb:=1.0", "-p", "stop_free_mb:=0.5"]
        rec = procs.start("recorder", args)
        from sensor_msgs.msg import CompressedImage, Image, JointState
        from std_msgs.msg import String

        raw_types = {"/camera/image_raw": Image, "/wrist/image/compressed": CompressedImage,
                     "/joint_states": JointState, "/teleop/joint_command": JointState,
                     f"{RECORDER}/episode_events": String}
        client = S.Client(int(env["ROS_DOMAIN_ID"]), RECORDER, raw_topics=raw_types)
        client.wait_ready(proc=rec)
        result["params"] = S.get_parameters(client, RECORDER, ["max_age", "max_wait", "command_type", "task",
                                                               "image_qos.reliability", "image_qos.durability", "image_qos.depth",
                                                               "state_qos.depth", "status_period"])
        client.spin(1.0)
        r = result["responses"]
        r["start0"] = client.call("start_episode")
        r["start_again"] = client.call("start_episode")
        client.spin(1.5)
        r["end0"] = client.call("end_episode")
        r["end_again"] = client.call("end_episode")
        client.set_task("second")
        client.spin(0.4)
        r["start_discarded"] = client.call("start_episode")
        client.spin(0.8)
        r["discard"] = client.call("discard_episode")
        r["start1"] = client.call("start_episode")
        client.spin(1.0)
        r["end1"] = client.call("end_episode")
        result["keyboard"] = _keyboard_session(procs, client, [("t third", "task label", 0.3),
                                                               ("s", "ok: episode 2 started", 1.0),
                                                               ("e", "ok: episode 2 committed", 0.2)])
        # disk space: with stop_free_mb above the free space the first write stops the episode, keeping it
        S.set_parameters(client, RECORDER, {"stop_free_mb": 1e12})
        r["start_disk"] = client.call("start_episode")
        client.spin(2.0)
        result["disk_status"] = list(client.status)
        r["end_disk"] = client.call("end_episode")
        S.set_parameters(client, RECORDER, {"stop_free_mb": 0.5})
        r["start3"] = client.call("start_episode")
        client.spin(0.8)
        result["recorder_rc"] = procs.stop(rec)  # SIGINT with an open episode: committed (on_shutdown: commit)
        procs.stop(fake)
        client.spin(0.3)
        result.update(status=client.status, events=client.events, diagnostics=client.diagnostics, raw=client.raw,
                      log=rec.log_path.read_text())
    finally:
        if client is not None:
            client.close()
        procs.close()
    return result


def test_services_and_shutdown(session):
    r = session["responses"]
    assert r["start0"].success and r["start0"].message.startswith("episode 0 started")
    assert not r["start_again"].success and "is recording" in r["start_again"].message
    assert r["end0"].success and r["end0"].message.startswith("episode 0 committed")
    assert not r["end_again"].success
    assert r["discard"].success and r["start1"].message.startswith("episode 1 started (task 'second')")
    assert r["end1"].success and r["end1"].message.startswith("episode 1 committed")
    assert session["recorder_rc"] == 0, session["log"][-2000:]
    assert "committed episode 4" in session["log"]
    ds = ZarrDataset.open(session["out"])
    # 0, 1 by service, 2 by keyboard, 3 stopped for disk space, 4 at shutdown; the discarded one left nothing
    assert ds.n_episodes == 5
    assert ds.attrs["episode_tasks"] == ["first", "second", "third", "third", "third"]
    notes = ds.attrs["episode_notes"]
    assert notes[:3] == ["", "", ""] and "disk space low" in notes[3] and "shut down" in notes[4]
    assert ds.attrs["episode_sources"] == ["recorder_node"] * 5
    lengths = np.diff(np.concatenate([[0], ds.episode_ends]))
    # at most one step per tick between the start and end events (fewer when a loaded machine made ticks stale)
    events = [e for e in session["events"] if e["event"] in ("start", "end", "discard")]
    spans = [(a["stamp_ns"], b["stamp_ns"]) for a, b in zip(events, events[1:]) if a["event"] == "start" and b["event"] == "end"]
    for (start, end), n in zip(spans, lengths):
        assert 0 < n <= (end - start) / 50e6 + 1, (start, end, n)
    assert [int(x) for x in lengths[:2]] == [int(r[n].message.split(": ")[1].split(" ")[0]) for n in ("end0", "end1")]


def test_parameters_from_yaml_files(session):
    p = session["params"]
    # shipped config/recorder.yaml (under /**/recorder_node, node in a namespace), then the test's YAML over it
    assert p["max_age"] == 0.1 and p["command_type"] == "JointState" and p["state_qos.depth"] == 2000 and p["image_qos.depth"] == 200
    assert p["image_qos.durability"] == "volatile"
    assert p["task"] == "first" and p["max_wait"] == 3.0 and p["status_period"] == 0.2
    assert p["image_qos.reliability"] == "reliable"


def test_dataset_matches_published(session):
    ds = ZarrDataset.open(session["out"])
    ds.validate(["robot_joint", "action", "camera_front", "camera_wrist", "timestamp"])
    cal = load_calibration(session["cal"])
    pre = {n: c.preprocess for n, c in cal.cameras.items()}
    pub = S.read_pub_log(session["tmp"] / "pub.jsonl")
    assert ds.array("camera_front").shape[1:] == (24, 32, 3) and ds.array("robot_joint").dtype == np.float32
    for i in range(ds.n_episodes):
        ep = ds.episode(i)
        ticks = S.tick_ns(ep["timestamp"], 20.0)
        assert np.all(np.diff(ticks) > 0) and np.all(np.diff(ticks) % 50_000_000 == 0)
        assert np.all(np.abs(ticks * 1e-9 - ep["timestamp"]) < 1e-6)
        S.check_episode(pub, ep, pre, 20.0, max_age=0.1, exact=True, where=f"episode {i}")
    # the publisher really sent malformed messages, and the recorder skipped and counted them
    final = session["status"][-1]
    assert all(final["bad"][s] > 0 for s in ("robot_joint", "action", "camera_front")), final


def test_status_and_diagnostics(session):
    status = session["status"]
    recording = [s for s in status if s["state"] == "recording"]
    assert recording and {"episode", "length", "dropped", "disk_free_mb", "stale", "bad"} <= set(recording[-1])
    assert max(s["length"] for s in recording) > 10 and recording[-1]["disk_free_mb"] > 0
    diags = [st for arr in session["diagnostics"] for st in arr.status if "recorder" in st.name]
    assert diags, "no /diagnostics from the recorder"
    keys = {kv.key for kv in diags[-1].values}
    assert {"episode", "length", "dropped", "disk_free_mb"} <= keys
    events = [e["event"] for e in session["events"]]
    assert events == ["start", "end", "start", "discard", "start", "end", "start", "end", "start", "end", "start"]


def test_disk_space_stop(session):
    r = session["responses"]
    assert r["start_disk"].success
    assert not r["end_disk"].success  # the recorder had already stopped and kept the episode
    stopped = [s for s in session["disk_status"] if s["state"] == "stopped"]
    assert stopped and "disk space low" in stopped[-1]["last_error"]
    diags = [st for arr in session["diagnostics"] for st in arr.status if "disk space low" in st.message]
    assert diags and diags[0].level == b"\x02"  # ERROR
    assert "RECORDING STOPPED" in session["log"]
    assert session["responses"]["start3"].success  # recording resumes once space is back


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bag2zarr_matches_recorder(session, storage, tmp_path):
    from vqbet_core.cli.main import main as vqbet

    types = dict(S.BAG_TYPES, **{f"{RECORDER}/episode_events": "std_msgs/msg/String"})
    bag = S.write_bag(tmp_path / f"bag_{storage}", session["raw"], types, storage)
    out = tmp_path / "from_bag.zarr"
    rc = vqbet(["bag2zarr", str(bag), "--calibration", str(session["cal"]), "--out", str(out), "--no-progress",
                "--episode-topic", f"{RECORDER}/episode_events", "--max-wait", "3.0", "--min-free-mb", "1"])
    assert rc == 0
    live, offline = ZarrDataset.open(session["out"]), ZarrDataset.open(out)
    # the bag holds the four episodes that ended with an event (the one closed by shutdown has none)
    assert offline.n_episodes == 4
    assert offline.attrs["episode_tasks"] == live.attrs["episode_tasks"][:4]
    for i in range(4):
        a, b = live.episode(i), offline.episode(i)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"episode {i} {key}")


def test_bringup_installs_launch_and_config(monkeypatch):
    """colcon runs vqbet_bringup/setup.py: it must install every top-level launch file, the YAML and the DDS profile."""
    import ast
    import runpy

    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    pkg = S.REPO / "ros2_ws/src/vqbet_bringup"
    monkeypatch.chdir(pkg)
    runpy.run_path(str(pkg / "setup.py"), run_name="__main__")
    files = {dest: [Path(pkg, f).resolve() for f in srcs] for dest, srcs in captured["data_files"]}
    assert set(files["share/vqbet_bringup/launch"]) == set((S.REPO / "launch").glob("*.launch.py"))
    assert SHIPPED_YAML.resolve() in files["share/vqbet_bringup/config"]
    assert DDS_PROFILE.resolve() in files["share/vqbet_bringup/config"]
    assert (pkg / "resource/vqbet_bringup").exists() and "<build_type>ament_python" in (pkg / "package.xml").read_text()
    # the launch file (not runnable here: no `launch` package) starts the console script setup.py declares
    tree = ast.parse((S.REPO / "launch/record.launch.py").read_text())
    calls = {n.func.id: n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    node = {k.arg: k.value for k in calls["Node"].keywords}
    assert node["package"].value == "vqbet_ros" and node["executable"].value == "recorder_node"
    assert "recorder_node = vqbet_ros.recorder_node:main" in (S.REPO / "ros2_ws/src/vqbet_ros/setup.py").read_text()


@pytest.mark.parametrize("name", ["policy", "record", "sim"])
def test_launch_files_set_dds_profile(name):
    """Each launch file declares ``dds_profile`` (default: the installed fastdds_large_images.xml) and, unless it
    is '', sets FASTRTPS_DEFAULT_PROFILES_FILE before its nodes start (read with ``ast``: no ``launch`` here)."""
    import ast

    tree = ast.parse((S.REPO / f"launch/{name}.launch.py").read_text())
    ret = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description")
    description = next(n.value for n in ast.walk(ret) if isinstance(n, ast.Return))
    actions = description.args[0].elts  # LaunchDescription([...]), in order

    def kind(call):
        return call.func.id if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) else None

    declare = [i for i, a in enumerate(actions) if kind(a) == "DeclareLaunchArgument" and a.args[0].value == "dds_profile"]
    setenv = [i for i, a in enumerate(actions) if kind(a) == "SetEnvironmentVariable"]
    nodes = [i for i, a in enumerate(actions) if kind(a) == "Node"]
    assert len(declare) == 1 and len(setenv) == 1 and nodes and declare[0] < setenv[0] < min(nodes)
    arg = {k.arg: k.value for k in actions[declare[0]].keywords}
    assert "fastdds_large_images.xml" in ast.unparse(arg["default_value"])
    assert "PathJoinSubstitution" in ast.unparse(arg["default_value"])
    assert "''" in arg["description"].value  # how to keep the environment's setting
    env = actions[setenv[0]]
    assert env.args[0].value == "FASTRTPS_DEFAULT_PROFILES_FILE"
    assert ast.unparse(env.args[1]) == "LaunchConfiguration('dds_profile')"
    condition = ast.unparse({k.arg: k.value for k in env.keywords}["condition"])
    assert condition == "UnlessCondition(EqualsSubstitution(LaunchConfiguration('dds_profile'), ''))"
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {"SetEnvironmentVariable", "UnlessCondition", "EqualsSubstitution", "PathJoinSubstitution"} <= imported
    if name != "sim":
        assert "FindPackageShare" in ast.unparse(arg["default_value"])


def test_dds_profile_is_the_shm_profile():
    """The shipped profile: SHM with a 16 MB segment + UDPv4, builtin transports off, default participant profile."""
    import xml.etree.ElementTree as ET

    ns = {"f": "http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles"}
    root = ET.parse(DDS_PROFILE).getroot()
    transports = {t.find("f:transport_id", ns).text: t for t in root.iterfind("f:transport_descriptors/f:transport_descriptor", ns)}
    assert {t.find("f:type", ns).text for t in transports.values()} == {"SHM", "UDPv4"}
    shm = next(t for t in transports.values() if t.find("f:type", ns).text == "SHM")
    assert int(shm.find("f:segment_size", ns).text) >= 16 * 1024 * 1024
    participant = root.find("f:participant", ns)
    assert participant.get("is_default_profile") == "true"
    assert participant.find("f:rtps/f:useBuiltinTransports", ns).text == "false"
    assert [t.text for t in participant.iterfind("f:rtps/f:userTransports/f:transport_id", ns)] == list(transports)


def test_ros_convert_with_rclpy_messages():
    """The node-side conversions on real rclpy message objects (array.array data, builtin Time stamps)."""
    from sensor_msgs.msg import Image, JointState

    from vqbet_ros import ros_convert as rc

    rgb = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for enc in ("rgb8", "bgr8"):
        msg = rc.rgb_to_image(rgb, 1_500_000_123, enc)
        assert isinstance(msg, Image) and rc.stamp_ns(msg) == 1_500_000_123
        np.testing.assert_array_equal(rc.image_to_rgb(msg), rgb)
    mono = rc.image_to_rgb(rc.rgb_to_image(rgb, 0, "mono8"))
    assert mono.shape == (5, 7, 3) and np.all(mono[..., 0] == mono[..., 2])
    np.testing.assert_array_equal(rc.compressed_to_rgb(rc.rgb_to_compressed(rgb, 0, "png")), rgb)
    bad = rc.rgb_to_image(rgb, 0, "rgb8")
    bad.step = 7  # smaller than width * 3
    with pytest.raises(ValueError, match="step 7 is smaller"):
        rc.image_to_rgb(bad)
    mapper = rc.JointMapper(["a", "b"])
    np.testing.assert_array_equal(rc.joint_positions(JointState(name=["b", "a"], position=[2.0, 1.0]), mapper), [1, 2])
    with pytest.raises(rc.MessageError, match="lacks joints"):
        rc.joint_positions(JointState(name=["b"], position=[2.0]), mapper)
    assert rc.has_cv_bridge() in (True, False)


def test_future_stamps_and_corrupt_frames_counted_on_arrival(tmp_path):
    """Issue 24 in the recorder: joint states / commands stamped 5 s ahead of the recorder's clock and corrupt
    compressed frames are each counted exactly on arrival (selected by a tick or not) and never stored; the
    clock offset shows in ~/status and /diagnostics (``clock_offset_s``)."""
    from sensor_msgs.msg import CompressedImage, JointState

    from vqbet_ros import ros_convert

    env = S.ros_env()
    cal = S.write_calibration(tmp_path)
    out = tmp_path / "clock.zarr"
    procs = S.Procs(env, tmp_path)
    client = None
    try:
        rec = procs.start("recorder", S.recorder_args(out, cal, {"cameras": "[wrist]", "max_wait": 0.3}))
        client = S.Client(int(env["ROS_DOMAIN_ID"]), "/recorder_node")
        node = client.node
        img_pub = node.create_publisher(CompressedImage, "/wrist/image/compressed", 50)
        js_pub = node.create_publisher(JointState, "/joint_states", 200)
        cmd_pub = node.create_publisher(JointState, "/teleop/joint_command", 200)
        now = lambda: node.get_clock().now().nanoseconds  # noqa: E731
        rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        png = bytes(ros_convert.rgb_to_compressed(rgb, 0, "png").data)
        jpeg = bytes(ros_convert.rgb_to_compressed(rgb, 0, "jpeg").data)
        corrupt = [b"", b"garbage", jpeg[: len(jpeg) // 2], png[:8], png[:-20], jpeg[:2] + jpeg[-2:]] * 3
        state = {"offset": 0, "future": {"robot_joint": 0, "action": 0}, "corrupt": list(corrupt), "sent_bad": 0}
        FUTURE = 99.0  # joint value of every future-stamped message: must never be stored

        def joints(pub, stream):
            def publish():
                offset = state["offset"]
                value = FUTURE if offset else 0.5
                pub.publish(ros_convert.joint_state(S.JOINTS, [value] * 3, now() + offset))
                state["future"][stream] += offset != 0
            return publish

        def frame():
            if state["corrupt"] and state["sent_bad"] < state.get("bad_quota", 0):
                msg = CompressedImage(format="png", data=state["corrupt"].pop())
                msg.header.stamp = ros_convert.ns_to_time(now())
                state["sent_bad"] += 1
            else:
                msg = ros_convert.rgb_to_compressed(rgb, now(), "png")
            img_pub.publish(msg)

        node.create_timer(0.01, joints(js_pub, "robot_joint"))
        node.create_timer(1 / 30, joints(cmd_pub, "action"))
        node.create_timer(1 / 30, frame)
        client.wait_ready(proc=rec)
        client.spin(1.0)
        assert client.call("start_episode").success
        client.spin(0.5)
        state["bad_quota"] = len(corrupt)  # 18 corrupt frames among good ones, at 30 Hz (a 20 Hz tick skips some)
        client.spin(1.5)
        t_off = time.monotonic()
        state["offset"] = 5 * 10**9
        client.spin(0.5)
        state["offset"] = 0
        during = [s for s in client.status if s.get("future_stamps", {}).get("robot_joint")]
        client.spin(0.8)
        end = client.call("end_episode")
        assert end.success, end.message
        client.spin(0.6)
        final = client.status[-1]
        diag = [st for arr in client.diagnostics for st in arr.status if "recorder" in st.name][-1]
    finally:
        if client is not None:
            client.close()
        procs.close()
    assert state["sent_bad"] == 18 and time.monotonic() - t_off > 1
    assert final["bad"]["camera_wrist"] == 18, final  # every corrupt frame, on arrival
    assert final["future_stamps"] == state["future"] and state["future"]["robot_joint"] >= 20, (final, state)
    assert final["bad"]["robot_joint"] == state["future"]["robot_joint"], final
    assert final["bad"]["action"] == state["future"]["action"], final
    assert any(abs(s["clock_offset_s"]["robot_joint"] - 5.0) < 0.1 for s in during), during
    assert abs(final["clock_offset_s"]["robot_joint"]) < 0.1  # back to the same clock
    assert "clock_offset_s" in {kv.key for kv in diag.values}
    ds = ZarrDataset.open(out)
    ep = ds.episode(0)
    assert len(ep["robot_joint"]) > 20 and not np.any(ep["robot_joint"] == FUTURE) and not np.any(ep["action"] == FUTURE)
