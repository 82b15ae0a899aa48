"""Record teleoperated demonstrations: ``ros2 launch vqbet_bringup record.launch.py output:=D.zarr calibration:=C.yaml``.

Starts recorder_node with config/recorder.yaml (override with params_file:=...). Episodes are driven with
``ros2 run vqbet_ros record_keyboard`` in a second terminal (s start, e end, d discard, t task) or the
services ~/start_episode, ~/end_episode, ~/discard_episode.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("output", description="zarr dataset to create or append to"),
        DeclareLaunchArgument("calibration", description="calibration YAML of the robot (joints, cameras)"),
        DeclareLaunchArgument("task", default_value="", description="task label of the first episode"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the recorder node"),
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare("vqbet_bringup"), "config", "recorder.yaml"]),
            description="recorder parameter file"),
        Node(
            package="vqbet_ros",
            executable="recorder_node",
            name="recorder_node",
            namespace=LaunchConfiguration("namespace"),
            parameters=[
                LaunchConfiguration("params_file"),
                {"output": LaunchConfiguration("output"),
                 "calibration": LaunchConfiguration("calibration"),
                 "task": LaunchConfiguration("task")},
            ],
            output="screen",
            emulate_tty=True,
        ),
    ])
