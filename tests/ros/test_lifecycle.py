"""policy_node and recorder_node as managed (lifecycle) nodes, over real DDS on loopback (private domain).

Each node runs as its own process, started as a user would (``python -m ...``, no lifecycle manager); this
test process drives it through ``lifecycle_msgs`` services and, where ``ros2 lifecycle`` is installed, the CLI.

- policy_node: starts configured but inactive (no trajectory); ``~/change_state`` activate -> trajectories
  flow; deactivate -> one hold, then nothing; ``~/enable`` still switches it; ``~/get_state`` and
  ``/diagnostics`` report the state; a transition not valid from the current state is refused and the node
  lives on; cleanup -> configure builds it again; ``ros2 lifecycle set`` activates it; SIGINT ends it with 0.
- recorder_node: active at start; deactivate with an episode open commits it (plain zarr reads it back) and
  refuses new episodes; activate accepts them again; the shutdown transition commits the open episode and
  the process exits with 0; ``start_active: false`` starts it inactive.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

sys.path.insert(0, str(Path(__file__).parent))
import _recorder_support as S  # noqa: E402
from tests.ros.test_policy_node import (NODE, NS, SHIPPED_YAML, Peer, _calibration, between, is_hold,  # noqa: E402
                                        ros_env, tiny_model)  # noqa: F401 - tiny_model: the fixture
from vqbet_core.calibration import load_calibration  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(400)]


def _ros2_lifecycle() -> str | None:
    """The ``ros2`` executable when its ``lifecycle`` verb (ros2lifecycle) is installed, else None."""
    for candidate in (Path(sys.executable).parent / "ros2", shutil.which("ros2")):
        if candidate and Path(candidate).exists():
            try:
                probe = subprocess.run([str(candidate), "lifecycle", "-h"], capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0 and "set" in probe.stdout:
                return str(candidate)
    return None


def change_state(call, node: str, label: str) -> bool:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    return call(ChangeState, f"{node}/change_state", ChangeState.Request(transition=Transition(label=label))).success


def get_state(call, node: str) -> str:
    from lifecycle_msgs.srv import GetState

    return call(GetState, f"{node}/get_state", GetState.Request()).current_state.label


# ---------------------------------------------------------------------- policy_node
@pytest.fixture(scope="module")
def policy(tiny_model, tmp_path_factory):
    """One policy_node process driven through its lifecycle; marks (wall times) and answers for the checks."""
    tmp = tmp_path_factory.mktemp("policy_lifecycle")
    cal_path = _calibration(tmp / "cal.yaml")
    cal = load_calibration(cal_path)
    joints = (cal.lower + cal.upper) / 2
    env = ros_env()
    log_path = tmp / "policy_node.log"
    args = [sys.executable, "-m", "vqbet_ros.policy_node", "--ros-args", "-r", f"__ns:={NS}",
            "--params-file", str(SHIPPED_YAML), "-p", f"model:={tiny_model}", "-p", f"calibration:={cal_path}",
            "-p", "task_sequence:=[microwave, slide_cabinet]", "-p", "diagnostics_period:=0.25", "-p", "threads:=1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    peer = None
    r = {"log": log_path, "marks": {}, "answers": {}, "states": {}}
    try:
        peer = Peer(int(env["ROS_DOMAIN_ID"]), cal.joint_names, joints)
        r["peer"] = peer
        m, a, st = r["marks"], r["answers"], r["states"]
        try:
            st["start"] = get_state(peer.call, NODE)
        except AssertionError:
            raise AssertionError(f"policy_node did not come up: {log_path.read_text()[-3000:]}") from None
        time.sleep(1.0)
        m["activate"] = time.time()
        a["activate"] = change_state(peer.call, NODE, "activate")
        st["activated"] = get_state(peer.call, NODE)
        time.sleep(1.5)
        m["deactivate"] = time.time()
        a["deactivate"] = change_state(peer.call, NODE, "deactivate")
        st["deactivated"] = get_state(peer.call, NODE)
        time.sleep(1.0)
        m["invalid"] = time.time()
        a["configure_twice"] = change_state(peer.call, NODE, "configure")  # not valid from inactive
        st["after_invalid"] = get_state(peer.call, NODE)
        m["enable"] = time.time()
        a["enable"] = peer.enable(True)
        st["enabled"] = get_state(peer.call, NODE)
        time.sleep(1.2)
        m["disable"] = time.time()
        a["disable"] = peer.enable(False)
        st["disabled"] = get_state(peer.call, NODE)
        time.sleep(0.8)
        m["cleanup"] = time.time()
        a["cleanup"] = change_state(peer.call, NODE, "cleanup")
        st["cleaned"] = get_state(peer.call, NODE)
        a["configure"] = change_state(peer.call, NODE, "configure")
        st["reconfigured"] = get_state(peer.call, NODE)
        a["enable_again"] = peer.enable(True)
        m["reenabled"] = time.time()
        time.sleep(1.2)
        a["disable_again"] = peer.enable(False)
        time.sleep(0.5)
        ros2 = _ros2_lifecycle()
        r["ros2"] = ros2
        if ros2 is not None:
            m["cli"] = time.time()
            r["cli_set"] = subprocess.run([ros2, "lifecycle", "set", "--no-daemon", "--spin-time", "5", NODE, "activate"],
                                          env=env, capture_output=True, text=True, timeout=120)
            r["cli_get"] = subprocess.run([ros2, "lifecycle", "get", "--no-daemon", "--spin-time", "5", NODE],
                                          env=env, capture_output=True, text=True, timeout=120)
            time.sleep(1.0)
            m["cli_deactivate"] = time.time()
            r["cli_unset"] = subprocess.run([ros2, "lifecycle", "set", "--no-daemon", "--spin-time", "5", NODE,
                                             "deactivate"], env=env, capture_output=True, text=True, timeout=120)
            st["cli_end"] = get_state(peer.call, NODE)
        m["end"] = time.time()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        r["returncode"] = proc.wait(20)
        yield r
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if peer is not None:
            peer.close()


def _commands(peer, t0, t1) -> list:
    return [msg for _, msg in between(peer, t0, t1) if not is_hold(msg)]


def test_policy_starts_inactive_and_publishes_nothing(policy):
    assert policy["states"]["start"] == "inactive"
    assert between(policy["peer"], 0, policy["marks"]["activate"]) == []
    early = [d for d in policy["peer"].diagnostics if d["_time"] < policy["marks"]["activate"]]
    assert early and all(d["lifecycle_state"] == "inactive" and d["enabled"] == "False" for d in early)
    assert "ready: disabled: call ~/enable" in policy["log"].read_text()


def test_policy_change_state_activates_and_deactivate_holds(policy):
    peer, m, a, st = policy["peer"], policy["marks"], policy["answers"], policy["states"]
    assert a["activate"] and st["activated"] == "active"
    assert len(_commands(peer, m["activate"], m["deactivate"])) >= 8, "activate: trajectories at 10 Hz for 1.5 s"
    assert any(d["lifecycle_state"] == "active" and d["commanding"] == "True" for d in peer.diagnostics
               if m["activate"] < d["_time"] < m["deactivate"])
    assert a["deactivate"] and st["deactivated"] == "inactive"
    after = between(peer, m["deactivate"], m["enable"])
    assert 1 <= len(after) <= 2 and is_hold(after[-1][1]), "deactivate: at most one chunk in flight, then one hold"
    assert all(t < m["deactivate"] + 0.5 for t, _ in after), "nothing after the hold"


def test_invalid_transition_is_refused_and_the_node_lives_on(policy):
    assert policy["answers"]["configure_twice"] is False
    assert policy["states"]["after_invalid"] == "inactive"


def test_enable_service_is_the_activate_deactivate_shortcut(policy):
    peer, m, a, st = policy["peer"], policy["marks"], policy["answers"], policy["states"]
    assert a["enable"].success and "enabled" in a["enable"].message and st["enabled"] == "active"
    assert len(_commands(peer, m["enable"], m["disable"])) >= 6
    assert a["disable"].success and a["disable"].message == "disabled" and st["disabled"] == "inactive"
    after = between(peer, m["disable"], m["cleanup"])
    assert 1 <= len(after) <= 2 and is_hold(after[-1][1])


def test_cleanup_then_configure_builds_the_node_again(policy):
    peer, m, a, st = policy["peer"], policy["marks"], policy["answers"], policy["states"]
    assert a["cleanup"] and st["cleaned"] == "unconfigured"
    assert a["configure"] and st["reconfigured"] == "inactive"
    assert a["enable_again"].success, a["enable_again"].message
    assert len(_commands(peer, m["reenabled"], m["reenabled"] + 1.2)) >= 6
    log = policy["log"].read_text()
    assert "lifecycle: cleaned up -> unconfigured" in log and log.count("model warmed up") == 2


def test_ros2_lifecycle_cli_switches_the_policy(policy):
    if policy["ros2"] is None:
        pytest.skip("ros2lifecycle is not installed: `ros2 lifecycle` is unavailable (the service path is tested)")
    peer, m = policy["peer"], policy["marks"]
    cli = policy["cli_set"]
    assert cli.returncode == 0 and "Transitioning successful" in cli.stdout, cli.stdout + cli.stderr
    assert "active [3]" in policy["cli_get"].stdout, policy["cli_get"].stdout + policy["cli_get"].stderr
    assert len(_commands(peer, m["cli"], m["cli_deactivate"])) >= 5
    assert policy["cli_unset"].returncode == 0 and policy["states"]["cli_end"] == "inactive"


def test_policy_sigint_exits_cleanly(policy):
    assert policy["returncode"] == 0, policy["log"].read_text()[-3000:]
    assert "Traceback" not in policy["log"].read_text()


# ---------------------------------------------------------------------- recorder_node
def _client_call(client):
    """A ``call(srv_type, name, request)`` for the recorder test client (it spins in this thread)."""

    def call(srv_type, name, request, timeout=15.0):
        cli = client.node.create_client(srv_type, name)
        try:
            end = time.monotonic() + timeout
            while not cli.service_is_ready():
                assert time.monotonic() < end, f"{name} not available"
                client.spin(0.05)
            future = cli.call_async(request)
            while not future.done():
                assert time.monotonic() < end, f"{name}: no answer within {timeout} s"
                client.executor.spin_once(timeout_sec=0.05)
            return future.result()
        finally:
            client.node.destroy_client(cli)

    return call


def _start_episode(client):
    for _ in range(100):  # refused while the streams are still being discovered
        started = client.call("start_episode")
        if started.success:
            return started
        client.spin(0.05)
    return started


def _read_plain(out: Path) -> list[int]:
    import zarr

    return [int(e) for e in zarr.open_group(str(out), mode="r")["meta/episode_ends"][:]]


def test_recorder_deactivate_commits_the_open_episode_and_activate_accepts_again(tmp_path):
    env = S.ros_env()
    cal = S.write_calibration(tmp_path)
    out = tmp_path / "lifecycle.zarr"
    procs = S.Procs(env, tmp_path)
    client = None
    node = "/recorder_node"
    try:
        procs.start("fake", S.fake_streams_args(tmp_path / "pub.jsonl", joint_hz=100))
        rec = procs.start("rec", S.recorder_args(out, cal, {"control_hz": 20.0, "flush_every": 5}))
        client = S.Client(int(env["ROS_DOMAIN_ID"]))
        client.wait_ready(proc=rec)
        call = _client_call(client)
        assert get_state(call, node) == "active"
        started = _start_episode(client)
        assert started.success, started.message
        end = time.monotonic() + 20
        while not any(s.get("length", 0) >= 10 for s in client.status):
            assert time.monotonic() < end, f"no steps recorded: {client.status[-1:]}"
            client.spin(0.05)
        assert change_state(call, node, "deactivate")
        assert get_state(call, node) == "inactive"
        ends = _read_plain(out)
        assert len(ends) == 1 and ends[0] >= 10, ends  # committed: plain zarr reads it back
        client.spin(0.5)
        ended = [e for e in client.events if e["event"] == "end"]
        assert ended and ended[-1]["episode"] == 0 and ended[-1]["length"] == ends[0]
        assert "recorder deactivated" in ended[-1].get("note", "")
        refused = client.call("start_episode")
        assert not refused.success and "inactive" in refused.message and "activate" in refused.message
        inactive = [s for s in client.status if s.get("lifecycle_state") == "inactive"]
        assert inactive and inactive[-1]["state"] == "idle"
        assert change_state(call, node, "activate") and get_state(call, node) == "active"
        assert _start_episode(client).success
        client.spin(1.0)
        done = client.call("end_episode")
        assert done.success and "episode 1 committed" in done.message, done.message
        assert len(_read_plain(out)) == 2
        # the shutdown transition with an episode open: committed, and the process ends on its own with 0
        assert _start_episode(client).success
        client.spin(1.0)
        assert change_state(call, node, "shutdown")
        assert rec.wait(15) == 0
        log = rec.log_path.read_text()
        assert re.search(r"committed episode 2 \(\d+ steps\) at shutdown", log) and "Traceback" not in log, log[-2000:]
        assert len(_read_plain(out)) == 3
    finally:
        if client is not None:
            client.close()
        procs.close()


def test_recorder_start_active_false_starts_inactive(tmp_path):
    env = S.ros_env()
    cal = S.write_calibration(tmp_path)
    procs = S.Procs(env, tmp_path)
    client = None
    try:
        rec = procs.start("rec", S.recorder_args(tmp_path / "idle.zarr", cal, {"start_active": "false"}))
        client = S.Client(int(env["ROS_DOMAIN_ID"]))
        client.wait_ready(proc=rec)
        call = _client_call(client)
        assert get_state(call, "/recorder_node") == "inactive"
        refused = client.call("start_episode")
        assert not refused.success and "inactive" in refused.message
        assert procs.stop(rec) == 0
        log = rec.log_path.read_text()
        assert "ready, inactive" in log and "Traceback" not in log
    finally:
        if client is not None:
            client.close()
        procs.close()
