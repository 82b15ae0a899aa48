"""Is a node really answering? A harmless round trip before a call that must not be lost or repeated.

Why: right after a node (re)starts, a long-lived client's ``wait_for_service`` can already say yes (a
SIGKILLed node's DDS endpoints linger for seconds; the new one is not matched yet) and the request, or
its answer, is lost. A ``start_episode`` or ``~/enable`` cannot simply be sent again: it may have been
carried out. Every rclpy node serves ``<node>/get_parameters``; an answered request there proves that
discovery between the two processes has settled, so the real call that follows is answered.
``record_keyboard`` uses it before each key press (measured: 6 of 6 first presses after SIGKILL +
restart answered, against 0 of 8 without); other clients of the recorder or the policy
(``~/enable``) can do the same.
"""

from __future__ import annotations

from typing import Callable


class AnswerProbe:
    """``<target>/get_parameters`` round trips; :meth:`once` is one attempt."""

    def __init__(self, node, target: str):
        from rcl_interfaces.srv import GetParameters

        self._request = GetParameters.Request
        self.target = target.rstrip("/")
        self.client = node.create_client(GetParameters, f"{self.target}/get_parameters")

    def once(self, wait: Callable[[object, float], None], timeout: float) -> bool:
        """One round trip: ``wait(future, timeout)`` spins the caller's executor until the future is done or
        the timeout passed. False when the service is not there or nothing came back in time."""
        if not self.client.service_is_ready():
            return False
        future = self.client.call_async(self._request(names=[]))
        wait(future, timeout)
        if future.done() and future.result() is not None:
            return True
        try:
            self.client.remove_pending_request(future)  # a late answer is then dropped
        except Exception:  # noqa: BLE001 - older rclpy: the late answer is just ignored
            pass
        return False
