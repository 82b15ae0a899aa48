"""The one ``main()`` body of the vqbet nodes: init, build, spin, always clean up.

Why shared: every node must turn SIGINT / SIGTERM into a clean exit and a bad parameter or input file
(``VqbetError``) into one line ``<node>: error: ...`` with exit status 2, and must release the robot /
dataset / simulator in ``finally`` whatever happened.
"""

from __future__ import annotations

import sys
from typing import Callable

from vqbet_core.errors import VqbetError


def run_node(name: str, make_node: Callable, args=None, spin: Callable | None = None,
             cleanup: Callable | None = None) -> int:
    """Run one node; ``spin(node)`` defaults to ``rclpy.spin``, ``cleanup(node)`` runs before destroy."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init(args=args)  # its signal handlers turn SIGINT / SIGTERM into ExternalShutdownException in spin
    node, code = None, 0
    try:
        node = make_node()
        (spin or rclpy.spin)(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except VqbetError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        code = 2
    finally:
        if node is not None:
            if cleanup is not None:
                cleanup(node)
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return code
