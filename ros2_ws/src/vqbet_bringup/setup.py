"""ament_python package that installs the launch files (kept at the repository's top-level ``launch/``), the
default parameter files (``config/*.yaml``) and the Fast DDS profile for camera images (``config/*.xml``) into
``share/vqbet_bringup``, so ``ros2 launch vqbet_bringup X.launch.py`` finds them after ``colcon build``."""

import os
from glob import glob

from setuptools import setup

package_name = "vqbet_bringup"
here = os.path.dirname(os.path.abspath(__file__))
# paths relative to this folder, as setuptools wants; every launch file at the top level is installed
launch_files = sorted(os.path.relpath(p, here) for p in glob(os.path.join(here, "..", "..", "..", "launch", "*.launch.py")))
config_files = sorted(os.path.relpath(p, here) for ext in ("yaml", "xml") for p in glob(os.path.join(here, "config", f"*.{ext}")))

setup(
    name=package_name,
    version="0.1.0",
    packages=[package_name],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{package_name}"]),
        (f"share/{package_name}", ["package.xml"]),
        (f"share/{package_name}/launch", launch_files),
        (f"share/{package_name}/config", config_files),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="vqbet-ros developers",
    maintainer_email="dev@vqbet-ros.invalid",
    description="Launch files and default parameters of vqbet-ros",
    license="MIT",
)
