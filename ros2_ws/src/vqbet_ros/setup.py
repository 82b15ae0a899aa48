"""ament_python package; also pip-installable (``pip install -e ros2_ws/src/vqbet_ros``)."""

from setuptools import setup

package_name = "vqbet_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=[package_name],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{package_name}"]),
        (f"share/{package_name}", ["package.xml"]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="vqbet-ros developers",
    maintainer_email="dev@vqbet-ros.invalid",
    description="ROS 2 nodes for VQ-BeT",
    license="MIT",
    entry_points={
        "console_scripts": [
            # "<executable> = vqbet_ros.<module>:main", one per node
            "recorder_node = vqbet_ros.recorder_node:main",
            "record_keyboard = vqbet_ros.record_keyboard:main",
            "fake_streams = vqbet_ros.fake_streams:main",
            "policy_node = vqbet_ros.policy_node:main",
            "sim_robot_node = vqbet_ros.sim_robot_node:main",
            "scripted_teleop_node = vqbet_ros.scripted_teleop_node:main",
        ],
    },
)
