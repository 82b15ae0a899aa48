"""vqbet_core: the learning library of vqbet-ros (data, models, training, export, runtime, simulation).

Nothing in this package imports ROS; the ROS nodes in ``ros2_ws/`` are thin shells over
``vqbet_core.runtime``.
"""

__version__ = "0.1.0"
