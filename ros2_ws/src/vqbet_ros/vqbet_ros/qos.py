"""QoS profiles from node parameters (``<prefix>.reliability``, ``<prefix>.depth``, ``<prefix>.durability``).

Why parameters: a subscriber whose reliability does not match the publisher's receives nothing (a
reliable subscriber never matches a best-effort camera driver), and which one a driver uses differs per
driver, so the choice must be a deployment setting. :func:`incompatible_qos_warning` turns the silent
mismatch into one log line that names the topic and the parameter to change.
"""

from __future__ import annotations

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from vqbet_core.errors import VqbetError

RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
DURABILITY = {"volatile": DurabilityPolicy.VOLATILE, "transient_local": DurabilityPolicy.TRANSIENT_LOCAL}


def make_qos(reliability: str = "best_effort", depth: int = 5, durability: str = "volatile", where: str = "qos") -> QoSProfile:
    """A keep-last profile; defaults are ROS's sensor-data profile (best effort, depth 5, volatile)."""
    if reliability not in RELIABILITY:
        raise VqbetError(f"{where}.reliability must be one of {sorted(RELIABILITY)}, got {reliability!r}")
    if durability not in DURABILITY:
        raise VqbetError(f"{where}.durability must be one of {sorted(DURABILITY)}, got {durability!r}")
    if int(depth) < 1:
        raise VqbetError(f"{where}.depth must be >= 1, got {depth}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth),
                      reliability=RELIABILITY[reliability], durability=DURABILITY[durability])


def qos_from_parameters(node: Node, prefix: str, reliability: str = "best_effort", depth: int = 5,
                        durability: str = "volatile") -> QoSProfile:
    """Declare ``<prefix>.reliability|depth|durability`` on ``node`` (with these defaults) and build the profile."""
    rel = node.declare_parameter(f"{prefix}.reliability", reliability).value
    dep = node.declare_parameter(f"{prefix}.depth", int(depth)).value
    dur = node.declare_parameter(f"{prefix}.durability", durability).value
    return make_qos(str(rel), int(dep), str(dur), where=prefix)


def incompatible_qos_warning(node: Node, topic: str, prefix: str):
    """An ``incompatible_qos`` event callback that says which parameter to change."""

    def callback(event) -> None:
        node.get_logger().warning(
            f"{topic}: a publisher's QoS is incompatible with this subscription ({event.last_policy_kind.name}); "
            f"no messages will arrive - set {prefix}.reliability to match the publisher",
            throttle_duration_sec=10.0)

    return callback
