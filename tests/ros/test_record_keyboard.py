"""record_keyboard against a recorder that is not there yet, then killed and restarted (issue 24.5).

Before: the first service call after a recorder (re)start timed out in 3-4 of 10 restarts (DDS matching;
a killed recorder's endpoints linger), so the operator's first "start" failed. Now the keyboard prints
``waiting for recorder ...`` and carries out the key press once the recorder answers; every first press
after a SIGKILL + restart must succeed.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

sys.path.insert(0, str(Path(__file__).parent))
import _recorder_support as S  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(400)]
RESTARTS = 6


class Keyboard:
    def __init__(self, env: dict, params: tuple = ()):
        self.proc = subprocess.Popen([sys.executable, "-m", "vqbet_ros.record_keyboard", "--ros-args",
                                      "-p", "recorder:=/recorder_node", *params], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line.rstrip()) for line in self.proc.stdout], daemon=True).start()

    def press(self, key: str) -> None:
        self.proc.stdin.write(key + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float = 60.0) -> float:
        """Waits for a line starting with ``prefix``; a failed call (no answer, refused) fails at once."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return time.monotonic()
            assert not line.startswith(("no answer", "refused", "recorder service")), f"{line!r}; output: {self.seen}"
        raise AssertionError(f"record_keyboard never printed {prefix!r}; output: {self.seen}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.press("q")
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def test_first_key_press_works_before_and_after_recorder_restarts(tmp_path):
    env = S.ros_env()
    cal = S.write_calibration(tmp_path)
    out = tmp_path / "d.zarr"
    procs = S.Procs(env, tmp_path)
    kb = Keyboard(env)
    answers = []
    try:
        kb.expect("keys:")
        kb.press("s")  # no recorder yet: the key waits, visibly
        kb.expect("waiting for recorder /recorder_node")
        rec = procs.start("recorder0", S.recorder_args(out, cal))
        t0 = time.monotonic()
        answers.append(kb.expect("ok: episode 0 started") - t0)
        kb.press("d")
        kb.expect("ok: episode discarded")
        for i in range(RESTARTS):
            procs.kill(rec)  # SIGKILL: its DDS endpoints linger for a while
            rec = procs.start(f"recorder{i + 1}", S.recorder_args(out, cal))
            t0 = time.monotonic()
            kb.press("s")  # at once: the recorder is still starting
            answers.append(kb.expect("ok: episode 0 started") - t0)
            kb.press("d")
            kb.expect("ok: episode discarded")
        assert "ready:" in rec.log_path.read_text()  # the recorder says it is ready (once spinning)
    finally:
        kb.close()
        procs.close()
    print(f"first start_episode answered {[round(a, 2) for a in answers]} s after each recorder (re)start")
    assert len(answers) == RESTARTS + 1


def test_key_m_marks_the_next_subtask_of_the_sequence(tmp_path):
    """Issue 25: ``m`` marks the current subtask of ``task_sequence`` done on the recorder's ~/subtask_done and says
    which; the recorder counts the marks of the open episode."""
    env = S.ros_env()
    cal = S.write_calibration(tmp_path)
    procs = S.Procs(env, tmp_path)
    rec = procs.start("recorder", S.recorder_args(tmp_path / "d.zarr", cal, {"task_names": "[reach, grasp]"}))
    kb = Keyboard(env, ("-p", "task_sequence:=[reach, grasp]"))
    client = None
    try:
        client = S.Client(int(env["ROS_DOMAIN_ID"]), "/recorder_node")
        client.wait_ready(proc=rec)
        kb.expect("keys:")
        kb.press("s")
        kb.expect("ok: episode 0 started; first subtask: 'reach'")
        kb.press("m")
        kb.expect("marked: subtask 'reach' done (1 of 2); next: 'grasp'")
        kb.press("m")
        kb.expect("marked: subtask 'grasp' done (2 of 2); sequence complete")
        kb.press("m")
        kb.expect("all 2 subtasks of the sequence are marked")
        end = time.monotonic() + 20
        while time.monotonic() < end and not (client.status and client.status[-1]["marks"] == 2):
            client.spin(0.1)
        assert client.status and client.status[-1]["marks"] == 2 and client.status[-1]["marks_refused"] == 0, client.status[-1:]
        kb.press("d")
        kb.expect("ok: episode discarded")
    finally:
        kb.close()
        if client is not None:
            client.close()
        procs.close()
