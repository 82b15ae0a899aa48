"""Run the policy: ``ros2 launch vqbet_bringup policy.launch.py model:=models/NAME calibration:=robot.yaml``.

Starts policy_node with config/policy.yaml (override with params_file:=...). The node starts disabled
unless enable:=true; enable it with ``ros2 service call /policy_node/enable std_srvs/srv/SetBool "{data: true}"``
(prefix the namespace when one is given). Launch arguments override the parameter file.

policy_node is a managed (lifecycle) node and needs no lifecycle manager or event handlers here: its own
``main()`` configures it (loads and warms up the model) and so brings it to ``inactive``, and with
``enable:=true`` (its ``enabled`` parameter) on to ``active``. Later ``ros2 lifecycle set /policy_node
activate|deactivate`` (deactivate sends one hold trajectory) or ``~/enable`` switch it.

The nodes run with the Fast DDS profile config/fastdds_large_images.xml (``dds_profile:=''`` keeps the
environment's FASTRTPS_DEFAULT_PROFILES_FILE): shared memory with a segment large enough for 640x480 images.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import UnlessCondition
from launch.substitutions import EqualsSubstitution, LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("model", description="exported model folder (vqbet export --out DIR)"),
        DeclareLaunchArgument("calibration", description="calibration YAML of the robot (joint order, limits, cameras)"),
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare("vqbet_bringup"), "config", "policy.yaml"]),
            description="policy_node parameter file"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the policy node"),
        DeclareLaunchArgument("use_sim_time", default_value="false", choices=["true", "false"],
                              description="use /clock (simulation)"),
        DeclareLaunchArgument("enable", default_value="false", choices=["true", "false"],
                              description="start commanding right away (default: wait for ~/enable)"),
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
            executable="policy_node",
            name="policy_node",
            namespace=LaunchConfiguration("namespace"),
            parameters=[
                LaunchConfiguration("params_file"),
                {"model": ParameterValue(LaunchConfiguration("model"), value_type=str),
                 "calibration": ParameterValue(LaunchConfiguration("calibration"), value_type=str),
                 "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
                 "enabled": ParameterValue(LaunchConfiguration("enable"), value_type=bool)},
            ],
            output="screen",
            emulate_tty=True,
        ),
    ])
