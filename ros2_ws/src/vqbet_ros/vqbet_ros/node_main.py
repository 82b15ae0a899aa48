"""The one ``main()`` body of the vqbet nodes: init, build, spin, always clean up.

Why shared: every node must turn SIGINT / SIGTERM into a clean exit and a bad parameter or input file
(``VqbetError``) into one line ``<node>: error: ...`` with exit status 2, and must release the robot /
dataset / simulator in ``finally`` whatever happened.

Signals. rclpy's own handlers (``rclpy.init()``'s default) shut the context down on the first SIGINT and
leave Python's ``KeyboardInterrupt`` armed for the next one: a second SIGINT - a second Ctrl-C, or the
SIGINT that ``ros2 launch`` sends every process on top of the terminal's group SIGINT - then raised
``KeyboardInterrupt`` inside the node's cleanup (e.g. in the recorder's sampler ``close()``), and the open
episode was lost. So the nodes install their own handlers instead
(``signal_handler_options=SignalHandlerOptions.NO``):

- the first SIGINT or SIGTERM only sets a flag; the spin loop looks at it at least every 0.1 s and leaves;
- while the node is still being built (loading a model, opening a store) the flag is looked at as soon as
  construction ends: a half-built node is never left behind with its threads running;
- every further SIGINT / SIGTERM is ignored: cleanup always runs to its end, with the ROS context still up
  (the policy can still publish its hold trajectory). From the start of cleanup the two signals are set to
  ``SIG_IGN``, not just to a Python handler that does nothing: Python resets its own handlers to the default
  action while the interpreter finalizes, and a late SIGINT (the second Ctrl-C of a terminal reaching a node
  that has just finished its cleanup) then killed the process with -2 after a clean shutdown; an ignored
  signal also interrupts no system call in the middleware's threads. Only SIGKILL stops a node harder, which
  is what ``ros2 launch`` escalates to when a process is still there 10 s after its SIGINT.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

from vqbet_core.errors import VqbetError

SPIN_PERIOD = 0.1  # s: longest time between a signal and the spin loop noticing it


class StopRequest:
    """What the signal handlers record: whether a stop was asked for, by which signals, and how often."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self._event = threading.Event()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:  # ``stopping()`` reads better in spin loops
        return self._event.is_set()

    def request(self, signum: int | None = None) -> None:
        if signum is not None:
            self.signals.append(signum)
        self._event.set()


def install_stop_handlers(name: str) -> StopRequest:
    """SIGINT / SIGTERM -> ``StopRequest`` flag; the repeats are ignored (see the module docstring)."""
    stop = StopRequest()

    def handler(signum, frame):  # noqa: ARG001 - the signal module's signature
        first = not stop.requested
        stop.request(signum)
        if not first and len(stop.signals) == 2:
            # os.write: no buffered I/O inside a signal handler (a print interrupting a print raises)
            try:
                os.write(2, f"{name}: {signal.Signals(signum).name} again: already stopping, cleanup runs to its "
                            f"end (ignored)\n".encode())
            except OSError:
                pass

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def ignore_stop_signals() -> None:
    """SIGINT and SIGTERM ignored by the kernel until the process ends (Python's finalization keeps SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def spin_until_stopped(node, stopping: Callable[[], bool], executor=None, until: Callable[[], bool] | None = None,
                       on_error: Callable[[Exception], None] | None = None) -> None:
    """Spin ``node`` (in ``executor``, default a SingleThreadedExecutor) until a signal or ``until()``.

    ``on_error(exc)``: callback errors (any ``Exception``) are handed to it and spinning goes on; without
    it they propagate.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    own = executor is None
    if own:
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)
    try:
        while rclpy.ok(context=node.context) and not stopping() and not (until is not None and until()):
            try:
                executor.spin_once(timeout_sec=SPIN_PERIOD)
            except Exception as exc:  # noqa: BLE001
                from rclpy.executors import ExternalShutdownException

                if on_error is None or isinstance(exc, ExternalShutdownException):
                    raise
                on_error(exc)
    finally:
        if own:
            executor.shutdown()


def run_node(name: str, make_node: Callable, args=None, spin: Callable | None = None,
             cleanup: Callable | None = None) -> int:
    """Run one node.

    ``spin(node, stopping)`` runs the node until ``stopping()`` turns true (a signal came) or it has done
    its job (default: :func:`spin_until_stopped`, which also ends when a managed node reaches ``finalized``);
    ``cleanup(node)`` runs before ``destroy_node``, with the ROS context still up and every further SIGINT /
    SIGTERM ignored. A managed node (:class:`vqbet_ros.lifecycle_base.ManagedNode`) is brought up right after
    it is built - configured, and activated when its startup parameter says so - so a plain ``ros2 run``
    needs no lifecycle manager; a failed configure is its ``VqbetError`` line, exit 2.
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = install_stop_handlers(name)
    node, code = None, 0
    try:
        node = make_node()
        if not stop.requested and hasattr(node, "bring_up"):
            node.bring_up()
        if not stop.requested:
            if spin is None:
                spin_until_stopped(node, stop, until=getattr(node, "is_finalized", None))
            else:
                spin(node, stop)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except VqbetError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        code = 2
    finally:
        stop.request()
        ignore_stop_signals()  # from here on every SIGINT / SIGTERM is a repeat: ignored, to the process's end
        try:
            if node is not None:
                if cleanup is not None:
                    cleanup(node)
                node.destroy_node()
        finally:
            if rclpy.ok():
                rclpy.shutdown()
    return code
