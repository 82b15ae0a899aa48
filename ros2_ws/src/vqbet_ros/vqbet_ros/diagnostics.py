"""``/diagnostics`` publishing for the nodes (recorder, policy): one status per node, key/value pairs.

Why a helper: the robot's diagnostic aggregator and rqt_robot_monitor read ``/diagnostics``; every node
should report the same way (level, one-line message, values as strings) with one call.
"""

from __future__ import annotations

from typing import Mapping

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

LEVELS = {"ok": DiagnosticStatus.OK, "warn": DiagnosticStatus.WARN, "error": DiagnosticStatus.ERROR,
          "stale": DiagnosticStatus.STALE}


class Diagnostics:
    """Publishes one ``DiagnosticStatus`` named ``<node name>: <name>`` on ``topic``."""

    def __init__(self, node: Node, name: str, hardware_id: str = "", topic: str = "/diagnostics"):
        self.node = node
        self.name = f"{node.get_name()}: {name}"
        self.hardware_id = hardware_id
        self.publisher = node.create_publisher(DiagnosticArray, topic, 10)

    def publish(self, level: str, message: str, values: Mapping[str, object]) -> DiagnosticArray:
        """``level`` is ok / warn / error / stale; ``values`` are formatted with ``str``."""
        status = DiagnosticStatus(level=LEVELS[level], name=self.name, message=message, hardware_id=self.hardware_id,
                                  values=[KeyValue(key=str(k), value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.node.get_clock().now().to_msg()
        self.publisher.publish(array)
        return array
