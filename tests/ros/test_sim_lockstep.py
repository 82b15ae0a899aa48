"""sim_robot_node in lockstep (``lockstep: true``) over real DDS: it owns the clock and waits for its commands.

A controller peer in this process answers every camera frame with a one-point trajectory due one period
after the frame's stamp, but only after 0.25 s (2.5 control periods of the 10 Hz block push): on the wall
clock every such command would be late. In lockstep the simulator must wait for each one: ``/clock`` advances
exactly one period per tick, every step executes a command (none rejected, no timeouts, no missed ticks),
and an episode's first step waits for the first command.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("pybullet")

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]
DELAY = 0.25
STEPS = 8


def test_lockstep_waits_for_each_late_command(tmp_path):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image, JointState
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    from vqbet_ros.sim_demo import NodeProcess, SimSession, ros_env, sim_robot_args

    env = ros_env()
    sim = NodeProcess("sim_robot_node", sim_robot_args(32, 200, seed=3) + ["-p", "lockstep:=true"], env,
                      tmp_path / "sim.log")
    session = SimSession(int(env["ROS_DOMAIN_ID"]))
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=int(env["ROS_DOMAIN_ID"]))
    peer = rclpy.create_node("late_controller", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(peer)
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    clock: list[int] = []
    joints: list[tuple[int, np.ndarray]] = []
    answering = threading.Event()
    pub = peer.create_publisher(JointTrajectory, "/arm_controller/joint_trajectory", reliable)
    timers = []

    def answer(msg: Image) -> None:
        if not answering.is_set() or not joints:
            return
        stamp = msg.header.stamp
        q = joints[-1][1]

        def send():
            traj = JointTrajectory(joint_names=["pusher_x", "pusher_y"])
            traj.header.stamp = stamp
            traj.points = [JointTrajectoryPoint(positions=[float(q[0]) + 0.002, float(q[1])])]
            traj.points[0].time_from_start.nanosec = 100_000_000  # one period after the frame
            pub.publish(traj)

        timer = threading.Timer(DELAY, send)
        timers.append(timer)
        timer.start()

    peer.create_subscription(Image, "/camera/image_raw", answer, reliable)
    peer.create_subscription(Clock, "/clock", lambda m: clock.append(m.clock.sec * 10**9 + m.clock.nanosec), 100)
    peer.create_subscription(JointState, "/joint_states", lambda m: joints.append(
        (m.header.stamp.sec * 10**9 + m.header.stamp.nanosec, np.asarray(m.position))), reliable)
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [executor.spin_once(timeout_sec=0.02) for _ in iter(stop.is_set, True)])
    spinner.start()
    try:
        session.wait_for(lambda: len(clock) > 3 and len(joints) > 3, 60, "the simulator's /clock and joint states")
        # the clock: one 10 Hz period per tick, whatever the wall clock does
        assert set(np.diff(clock[-3:])) == {100_000_000}
        started = session.reset()
        time.sleep(1.0)  # nobody answers yet: the episode's first step waits (the reset observation again)
        values = session.node_diagnostics("sim_robot_node")
        session.wait_for(lambda: session.node_diagnostics("sim_robot_node").get("episode") == str(started["episode"]),
                         10, "diagnostics of the new episode")
        assert session.node_diagnostics("sim_robot_node")["episode_steps"] == "0", values
        answering.set()
        t0 = time.monotonic()
        session.wait_for(lambda: int(session.node_diagnostics("sim_robot_node").get("episode_steps", 0)) >= STEPS,
                         60, f"{STEPS} lockstep steps")
        wall = time.monotonic() - t0
        time.sleep(1.2)
        d = session.node_diagnostics("sim_robot_node")
        steps = int(d["episode_steps"])
        # each step waited for its late command: slower than real time, and nothing lost or rejected
        assert wall > STEPS * DELAY * 0.8, wall
        assert d["rejected"] == "0" and d["missed_ticks"] == "0" and d["lockstep_timeouts"] == "0", d
        assert int(d["lockstep_waits"]) >= steps - 1, d
        ticks = np.diff(clock[-steps:])
        assert set(ticks) == {100_000_000}, ticks
    finally:
        answering.clear()
        for t in timers:
            t.cancel()
        stop.set()
        spinner.join(5)
        executor.shutdown()
        peer.destroy_node()
        rclpy.shutdown(context=context)
        session.close()
        assert sim.stop() == 0, sim.log_tail()
