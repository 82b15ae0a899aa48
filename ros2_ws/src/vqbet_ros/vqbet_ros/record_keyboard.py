"""record_keyboard: the operator's keys for the recorder - s start, e end (commit), d discard, t task, q quit.

Why a separate helper: the operator's hands are on the teleop device; one key per action (no typing
of service calls) makes start/end timing consistent. It calls the recorder's std_srvs/Trigger services
and publishes task labels on ``<recorder>/task``. On a terminal keys act immediately; with piped input
each line is one command (``t open the drawer`` sets a task label).

Run: ``ros2 run vqbet_ros record_keyboard --ros-args -p recorder:=/recorder_node``
"""

from __future__ import annotations

import os
import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from std_msgs.msg import String
from std_srvs.srv import Trigger

HELP = "keys: s = start episode, e = end (commit), d = discard, t = set task label, q = quit"


class RecordKeyboard(Node):
    def __init__(self, **kwargs):
        super().__init__("record_keyboard", **kwargs)
        recorder = self.declare_parameter("recorder", "/recorder_node").value.rstrip("/")
        self.timeout = float(self.declare_parameter("timeout", 5.0).value)
        self.clients_by_key = {key: self.create_client(Trigger, f"{recorder}/{name}")
                               for key, name in (("s", "start_episode"), ("e", "end_episode"), ("d", "discard_episode"))}
        self.task_pub = self.create_publisher(String, f"{recorder}/task", 10)

    def call(self, key: str) -> str:
        client = self.clients_by_key[key]
        if not client.wait_for_service(timeout_sec=self.timeout):
            return f"recorder service {client.srv_name} not available"
        future = client.call_async(Trigger.Request())
        rclpy.spin_until_future_complete(self, future, timeout_sec=self.timeout)
        if not future.done():
            return f"no answer from {client.srv_name} within {self.timeout:g} s"
        result = future.result()
        return ("ok: " if result.success else "refused: ") + result.message

    def set_task(self, label: str) -> str:
        # a message published before discovery has matched the recorder is lost: wait for it first
        end = self.get_clock().now().nanoseconds + int(self.timeout * 1e9)
        while self.task_pub.get_subscription_count() == 0:
            if self.get_clock().now().nanoseconds > end:
                return f"task label not sent: nobody subscribes to {self.task_pub.topic_name}"
            rclpy.spin_once(self, timeout_sec=0.05)
        self.task_pub.publish(String(data=label))
        return f"task label: '{label}'"

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
    node = RecordKeyboard()
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
