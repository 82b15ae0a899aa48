#!/usr/bin/env bash
# Source ROS 2 Jazzy and the vqbet workspace, then run the given command.
set -e
source /opt/ros/jazzy/setup.bash
source /opt/vqbet/ros2_ws/install/setup.bash
exec "$@"
