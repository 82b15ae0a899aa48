"""record_keyboard: the operator's keys for the recorder - s start, e end (commit), d discard, t task,
m subtask done, q quit.

Why a separate helper: the operator's hands are on the teleop device; one key per action (no typing
of service calls) makes start/end timing consistent. It calls the recorder's std_srvs/Trigger services
and publishes task labels on ``<recorder>/task``. On a terminal keys act immediately; with piped input
each line is one command (``t open the drawer`` sets a task label).

Before each service call it makes sure the recorder answers: a round trip to the recorder's
``get_parameters`` service (harmless, repeated until answered) proves that DDS discovery between the two
processes has settled. Why: right after the recorder (re)starts, ``wait_for_service`` can already say
yes (a killed recorder's endpoints linger for seconds) while a request or its answer is still lost, and
a lost ``start_episode`` cannot simply be sent again. Meanwhile it prints one line,
``waiting for recorder /recorder_node ...``, and the key press is carried out once the recorder is there
(``wait`` seconds at most; 0 = no limit).

Subtask marks (long-horizon recordings, DESIGN.md section 9): with ``task_sequence`` (the subtasks in the
order the operator will do them, e.g. ``-p "task_sequence:=[microwave, kettle, light_switch]"``), ``m``
marks the current subtask done: it publishes its name on ``<recorder>/subtask_done`` (the recorder stamps it
with its receive time), prints which one was marked and moves to the next. ``s`` (a started episode)
begins the sequence again. ``m <name>`` marks a named subtask instead (out of sequence; the sequence then
continues after it). The recorder's ``task_names`` must list every name.

Run: ``ros2 run vqbet_ros record_keyboard --ros-args -p recorder:=/recorder_node``
"""

from __future__ import annotations

import os
import sys

import time

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from std_msgs.msg import String
from std_srvs.srv import Trigger

from vqbet_core.errors import VqbetError
from vqbet_ros.answering import AnswerProbe
from vqbet_ros.params import declare

HELP = "keys: s = start episode, e = end (commit), d = discard, t = set task label, m = subtask done, q = quit"


class RecordKeyboard(Node):
    def __init__(self, **kwargs):
        super().__init__("record_keyboard", **kwargs)
        recorder = str(declare(self, "recorder", "/recorder_node", "the recorder node's full name")).rstrip("/")
        self.timeout = declare(self, "timeout", 5.0, "seconds to wait for the answer of a service call")
        self.wait = declare(self, "wait", 0.0, "seconds to wait for the recorder to appear; 0 = no limit")
        if not recorder:
            raise VqbetError("parameter recorder is empty: give the recorder node's name, e.g. /recorder_node")
        if not self.timeout > 0:
            raise VqbetError(f"parameter timeout must be > 0 seconds, got {self.timeout}")
        if not self.wait >= 0:
            raise VqbetError(f"parameter wait must be >= 0 seconds (0 = no limit), got {self.wait}")
        self.recorder = recorder
        self.say = lambda line: print(line, flush=True)
        self.clients_by_key = {key: self.create_client(Trigger, f"{recorder}/{name}")
                               for key, name in (("s", "start_episode"), ("e", "end_episode"), ("d", "discard_episode"))}
        self.probe = AnswerProbe(self, recorder)
        self.task_pub = self.create_publisher(String, f"{recorder}/task", 10)
        self.sequence = [str(n) for n in declare(self, "task_sequence", [""], "subtasks in the order they are done; "
                                                 "key m marks the current one done", array=True) if str(n)]
        self.next_subtask = 0  # index into sequence of the subtask being done
        self.mark_pub = self.create_publisher(String, f"{recorder}/subtask_done", 50)

    def _publish(self, pub, data: str) -> str | None:
        """Publish once the recorder subscribes (a message sent before discovery matched it is lost)."""
        end = self.get_clock().now().nanoseconds + int(self.timeout * 1e9)
        while pub.get_subscription_count() == 0:
            if self.get_clock().now().nanoseconds > end:
                return f"not sent: nobody subscribes to {pub.topic_name}"
            rclpy.spin_once(self, timeout_sec=0.05)
        pub.publish(String(data=data))
        return None

    def mark(self, name: str = "") -> str:
        """``m``: the current subtask of ``task_sequence`` (or ``name``) is done."""
        if not name:
            if not self.sequence:
                return "no task_sequence: give -p \"task_sequence:=[a, b, c]\" or type 'm <subtask name>'"
            if self.next_subtask >= len(self.sequence):
                return f"all {len(self.sequence)} subtasks of the sequence are marked: end the episode (e)"
            name = self.sequence[self.next_subtask]
        error = self._publish(self.mark_pub, name)
        if error:
            return f"subtask '{name}' {error}"
        if name in self.sequence[self.next_subtask:]:
            self.next_subtask = self.sequence.index(name, self.next_subtask) + 1
        upcoming = self.sequence[self.next_subtask] if self.next_subtask < len(self.sequence) else ""
        position = f" ({self.sequence.index(name) + 1} of {len(self.sequence)})" if name in self.sequence else ""
        return (f"marked: subtask '{name}' done{position}" + (f"; next: '{upcoming}'" if upcoming else
                                                             ("; sequence complete" if self.sequence else "")))

    def wait_for_recorder(self, client) -> str | None:
        """Until the recorder answers a harmless request and ``client``'s service is there; an error text or None."""
        end = time.monotonic() + (self.wait or float("inf"))
        said = False
        wait = lambda future, timeout: rclpy.spin_until_future_complete(self, future, timeout_sec=timeout)  # noqa: E731
        while True:
            if client.service_is_ready() and self.probe.client.service_is_ready():
                if self.probe.once(wait, 0.5 if not said else 1.0):
                    if said:
                        self.say(f"recorder {self.recorder} is ready")
                    return None
            else:
                rclpy.spin_once(self, timeout_sec=0.1)
            if not said:
                self.say(f"waiting for recorder {self.recorder} ... (is recorder_node running? q quits)")
                said = True
            if time.monotonic() > end:
                return f"recorder {self.recorder} not available after {self.wait:g} s (is recorder_node running?)"

    def call(self, key: str) -> str:
        client = self.clients_by_key[key]
        error = self.wait_for_recorder(client)
        if error:
            return error
        future = client.call_async(Trigger.Request())
        rclpy.spin_until_future_complete(self, future, timeout_sec=self.timeout)
        if not future.done():
            return (f"no answer from {client.srv_name} within {self.timeout:g} s (it may still have acted: "
                    f"see {self.recorder}/status before pressing again)")
        result = future.result()
        if key == "s" and result.success:
            self.next_subtask = 0  # a new episode: the sequence starts again
            if self.sequence:
                return f"ok: {result.message}; first subtask: '{self.sequence[0]}'"
        return ("ok: " if result.success else "refused: ") + result.message

    def set_task(self, label: str) -> str:
        # a message published before discovery has matched the recorder is lost: wait for it first
        error = self._publish(self.task_pub, label)
        return f"task label {error}" if error else f"task label: '{label}'"

    def command(self, line: str) -> str | None:
        """One command (a key, or ``t <label>``); returns the text to show, None to quit."""
        line = line.strip()
        if not line:
            return ""
        key, rest = line[0].lower(), line[1:].strip()
        if key == "q":
            return None
        if key in self.clients_by_key:
            return self.call(key)
        if key == "t":
            return self.set_task(rest)
        if key == "m":
            return self.mark(rest)
        return HELP


def _read_keys(node: RecordKeyboard) -> None:
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        while True:
            key = os.read(fd, 1).decode(errors="ignore")
            if key.lower() == "t":
                termios.tcsetattr(fd, termios.TCSADRAIN, old)
                try:
                    out = node.command("t " + input("task label: "))
                finally:
                    tty.setcbreak(fd)
            else:
                out = node.command(key)
            if out is None:
                return
            if out:
                print(out, flush=True)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def main(args=None) -> int:
    rclpy.init(args=args)
    try:
        node = RecordKeyboard()
    except VqbetError as exc:
        print(f"record_keyboard: error: {exc}", file=sys.stderr)
        rclpy.shutdown()
        return 2
    print(HELP, flush=True)
    try:
        if sys.stdin.isatty():
            _read_keys(node)
        else:
            for line in sys.stdin:
                out = node.command(line)
                if out is None:
                    break
                if out:
                    print(out, flush=True)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
