"""The clock rule for input stamps: one implementation for ``policy_node``, ``recorder_node`` and ``bag2zarr``.

Why: a message's header stamp comes from another clock (a camera, a second computer). If that clock runs
N s ahead and the stamp alone decided an input's age, the age would go negative and a stream that has
died would look fresh for N s more: the policy's stale-input stop (``max_age``) would be stretched by N s.
The rule, everywhere a stamp is taken (seconds here; the nodes use the same functions in ns or s):

1. ``received`` is this side's clock when the message arrived (the node's clock; the bag's log time
   offline). A stamp more than ``future_tolerance`` ahead of ``received`` is a bad message
   (:class:`~vqbet_core.recording.messages.FutureStampError`): counted and not used
   (:func:`vqbet_core.recording.messages.choose_stamp` enforces it).
2. The age of an input at ``now`` is ``max(now - stamp, now - received)`` (:func:`input_age`): a stamp
   can make an input older than its arrival says, never younger. So the age is at least the time since
   the message arrived on this node's clock, whatever the sender's clock says: no offset can extend
   ``max_age``. A stamp behind (an old stamp, or a sender clock running behind) makes the input older,
   which stops sooner, never later.
3. The clock offset of a stream, ``stamp - received`` (the sender's clock minus ours, less the transport
   latency), is measured over its recent messages, the rejected ones included (:class:`OffsetMeter`),
   and reported in ``/diagnostics`` (``clock_offset_<stream>_s``), so a wrong clock is seen, not guessed.

ROS-free: unit tests import it without rclpy.
"""

from __future__ import annotations

import math
from collections import deque

#: default ``future_tolerance`` (s): stamps up to this far ahead of the receive time are accepted
#: (clock synchronisation error between two computers; on one computer stamps are never ahead)
DEFAULT_FUTURE_TOLERANCE = 0.1


def input_age(now: float, stamp: float, received: float) -> float:
    """Age of an input at ``now``: ``max(now - stamp, now - received)`` (same unit for all three).

    Never less than the time since it arrived, so a sender's clock ahead of ours cannot make it look fresh.
    """
    return max(now - stamp, now - received)


def behind_note(now: float, stamp: float, received: float, max_age: float) -> str:
    """Why an input is stale, when its stamp (not its arrival) makes it so: the likely clock offset."""
    if now - received <= max_age < now - stamp:
        return f"; it arrived {now - received:.3f} s ago but its stamp is {received - stamp:.3f} s older: clock offset?"
    return ""


class OffsetMeter:
    """``stamp - received`` of one stream over its last ``window`` messages; :meth:`offset` is their median.

    Positive: the sender's clock is ahead of ours (stamps in the future); negative: behind, or transport
    latency (a few ms on one computer). Rejected (future) messages are measured too: they are the ones
    that show the offset.
    """

    __slots__ = ("_values",)

    def __init__(self, window: int = 9):
        self._values: deque = deque(maxlen=window)

    def add(self, stamp: float, received: float) -> float:
        value = stamp - received
        self._values.append(value)
        return value

    def offset(self) -> float:
        """Median of the window (NaN before any message)."""
        if not self._values:
            return math.nan
        ordered = sorted(self._values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    def text(self, scale: float = 1.0) -> str:
        """The offset for ``/diagnostics`` in seconds (``scale`` converts the unit, e.g. 1e-9 for ns)."""
        value = self.offset()
        return "nan" if math.isnan(value) else f"{value * scale:.3f}"
