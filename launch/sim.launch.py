"""The whole loop on a simulated robot: ``ros2 launch vqbet_bringup sim.launch.py model:=models/NAME``.

``mode:=policy`` (default): sim_robot_node + policy_node (enabled at start) - the exported model drives the
simulated arm over the same topics as on hardware. ``mode:=record``: sim_robot_node + scripted_teleop_node +
recorder_node - the env's scripted expert teleoperates the simulated arm and the recorder writes
``output:=D.zarr`` (``episodes:=N``: then the teleop node exits and the launch shuts down, the recorder closing
its store; ``episodes:=0`` records until Ctrl-C, which commits the open episode), the record -> train path
without hardware. Parameters come from config/sim.yaml (override with params_file:=...); the policy node also
reads config/policy.yaml first, the recorder config/recorder.yaml. ``calibration`` defaults to the block-push
gantry's file installed in share/vqbet_bringup/calibration (a path of your own, absolute or relative to the
folder ``ros2 launch`` runs in, still works). In policy mode episodes follow each other (``auto_reset``)
without clearing the policy's history; ``python -m vqbet_ros.sim_demo`` instead toggles ``~/enable`` around
each ``~/reset``.

``namespace:=NAME`` puts the whole loop under /NAME: the nodes (/NAME/sim_robot_node, ...), their services, and
the topics of the loop (/NAME/joint_states, /NAME/camera/image_raw, /NAME/arm_controller/joint_trajectory,
/NAME/teleop/joint_command, /NAME/sim/state, /NAME/sim/episode_result: the parameter files' absolute names are
remapped into the namespace), so several simulations can run side by side. /diagnostics stays global.

policy_node and recorder_node are managed (lifecycle) nodes that bring themselves up (no lifecycle manager or
event handlers here): policy_node is configured and, with ``enabled: true`` as set here, active; recorder_node
configured and active (``start_active``, default true). ``ros2 lifecycle set /NAME/policy_node deactivate``
holds the simulated arm, ``activate`` resumes; ``ros2 lifecycle get`` reports the state.

The nodes run with the Fast DDS profile config/fastdds_large_images.xml (``dds_profile:=''`` keeps the
environment's FASTRTPS_DEFAULT_PROFILES_FILE): shared memory with a segment large enough for 640x480 images.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable, Shutdown
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import EqualsSubstitution, LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

CONFIG = PathJoinSubstitution([FindPackageShare("vqbet_bringup"), "config"])
IS_POLICY = EqualsSubstitution(LaunchConfiguration("mode"), "policy")  # "true" / "false"
POLICY = IfCondition(IS_POLICY)
RECORD = IfCondition(EqualsSubstitution(LaunchConfiguration("mode"), "record"))
# the loop's topics (the parameter files name them absolutely): remapped to relative names, which resolve in
# the launch's namespace (no namespace: unchanged)
LOOP_TOPICS = ["/joint_states", "/camera/image_raw", "/arm_controller/joint_trajectory", "/teleop/joint_command",
               "/sim/state", "/sim/episode_result"]
REMAP = [(topic, topic.lstrip("/")) for topic in LOOP_TOPICS]


def generate_launch_description():
    params = LaunchConfiguration("params_file")
    ns = LaunchConfiguration("namespace")
    return LaunchDescription([
        DeclareLaunchArgument("mode", default_value="policy", choices=["policy", "record"],
                              description="policy: run a model on the simulated robot; record: scripted teleop + recorder"),
        DeclareLaunchArgument("model", default_value="", description="exported model folder (mode:=policy)"),
        DeclareLaunchArgument("output", default_value="sim_demos.zarr", description="dataset to write (mode:=record)"),
        DeclareLaunchArgument("episodes", default_value="10", description="episodes to record (mode:=record; 0 = until stopped)"),
        DeclareLaunchArgument("calibration",
                              default_value=PathJoinSubstitution([FindPackageShare("vqbet_bringup"), "calibration",
                                                                  "blockpush_sim.yaml"]),
                              description="calibration YAML of the simulated robot (joint names, limits, camera)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the nodes and the loop's topics"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([CONFIG, "sim.yaml"]),
                              description="parameters of the simulator, teleop and policy nodes"),
        DeclareLaunchArgument("seed", default_value="1000", description="env seed of the first episode"),
        DeclareLaunchArgument(
            "dds_profile",
            default_value=PathJoinSubstitution([CONFIG, "fastdds_large_images.xml"]),
            description="Fast DDS XML profile for the nodes (sets FASTRTPS_DEFAULT_PROFILES_FILE, rmw_fastrtps_cpp "
                        "only); the default gives shared memory a 16 MB segment, so 640x480 images skip the "
                        "network path; '' keeps the environment's setting"),
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE", LaunchConfiguration("dds_profile"),
                               condition=UnlessCondition(EqualsSubstitution(LaunchConfiguration("dds_profile"), ""))),
        Node(package="vqbet_ros", executable="sim_robot_node", name="sim_robot_node", namespace=ns, remappings=REMAP,
             parameters=[params, {"seed": ParameterValue(LaunchConfiguration("seed"), value_type=int),
                                  "autostart": ParameterValue(IS_POLICY, value_type=bool),
                                  "auto_reset": ParameterValue(IS_POLICY, value_type=bool)}],
             output="screen", emulate_tty=True),
        Node(package="vqbet_ros", executable="policy_node", name="policy_node", condition=POLICY, namespace=ns,
             remappings=REMAP,
             parameters=[PathJoinSubstitution([CONFIG, "policy.yaml"]), params,
                         {"model": ParameterValue(LaunchConfiguration("model"), value_type=str),
                          "calibration": ParameterValue(LaunchConfiguration("calibration"), value_type=str),
                          "enabled": True}],
             output="screen", emulate_tty=True),
        # relative node names: the recorder and simulator in this launch's namespace; exits after its episodes,
        # and the launch with it
        Node(package="vqbet_ros", executable="scripted_teleop_node", name="scripted_teleop_node", condition=RECORD,
             namespace=ns, remappings=REMAP,
             parameters=[params, {"recorder": "recorder_node", "sim_node": "sim_robot_node", "exit_when_done": True,
                                  "episodes": ParameterValue(LaunchConfiguration("episodes"), value_type=int)}],
             output="screen", emulate_tty=True,
             on_exit=Shutdown(reason="scripted_teleop_node is done (episodes:=N recorded, or it stopped)")),
        Node(package="vqbet_ros", executable="recorder_node", name="recorder_node", condition=RECORD, namespace=ns,
             remappings=REMAP,
             parameters=[PathJoinSubstitution([CONFIG, "recorder.yaml"]),
                         {"output": ParameterValue(LaunchConfiguration("output"), value_type=str),
                          "calibration": ParameterValue(LaunchConfiguration("calibration"), value_type=str)}],
             output="screen", emulate_tty=True),
    ])
