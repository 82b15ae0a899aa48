"""Record teleoperated demonstrations: ``ros2 launch vqbet_bringup record.launch.py output:=D.zarr calibration:=C.yaml``.

Starts recorder_node with config/recorder.yaml (override with params_file:=...). Episodes are driven with
``ros2 run vqbet_ros record_keyboard`` in a second terminal (s start, e end, d discard, t task) or the
services ~/start_episode, ~/end_episode, ~/discard_episode.

recorder_node is a managed (lifecycle) node and needs no lifecycle manager or event handlers here: its own
``main()`` configures it (opens the store: ``inactive``) and, by default (``start_active: true`` in the
parameter file), activates it (accepts episodes). ``ros2 lifecycle set /recorder_node deactivate`` commits
(or discards, per ``on_shutdown``) the open episode and refuses new ones until ``activate``.

The nodes run with the Fast DDS profile config/fastdds_large_images.xml (``dds_profile:=''`` keeps the
environment's FASTRTPS_DEFAULT_PROFILES_FILE): shared memory with a segment large enough for 640x480 images.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import UnlessCondition
from launch.substitutions import EqualsSubstitution, LaunchConfiguration, PathJoinSubstitution
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
        DeclareLaunchArgument(
            "dds_profile",
            default_value=PathJoinSubstitution([FindPackageShare("vqbet_bringup"), "config", "fastdds_large_images.xml"]),
            description="Fast DDS XML profile for the nodes (sets FASTRTPS_DEFAULT_PROFILES_FILE, rmw_fastrtps_cpp "
                        "only); the default gives shared memory a 16 MB segment, so 640x480 images skip the "
                        "network path; '' keeps the environment's setting"),
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE", LaunchConfiguration("dds_profile"),
                               condition=UnlessCondition(EqualsSubstitution(LaunchConfiguration("dds_profile"), ""))),
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
