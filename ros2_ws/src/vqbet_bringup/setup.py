"""ament_python package that installs into ``share/vqbet_bringup``:

- ``launch/*.launch.py``: the launch files, kept at the repository's top-level ``launch/`` folder;
- ``calibration/*.yaml``: the calibration files, kept at the top-level ``calibration/`` folder (the launch
  files' defaults point here, so ``ros2 launch`` works from any folder);
- ``config/*.yaml``: a default parameter file per node, ``config/*.xml``: the Fast DDS profile for images;

so ``ros2 launch vqbet_bringup X.launch.py`` finds them after ``colcon build``.

How the top-level folders get in: ``launch`` and ``calibration`` in this folder are symbolic links (in git)
to ``../../../launch`` and ``../../../calibration``, so every ``data_files`` source lies *inside* the package.
colcon needs that: with ``--symlink-install`` it links each ``data_files`` source into the build base at
the same relative path and runs ``setup.py develop`` there, so a ``../../../launch`` source made links
outside the build base (and no launch files) as soon as ``--build-base`` had another depth. When the links
are broken (the package copied without the repository around it) the build stops with an error naming them.
"""

import os
import sys
from glob import glob

from setuptools import setup

package_name = "vqbet_bringup"
here = os.path.dirname(os.path.abspath(__file__))  # the source folder, or colcon's build folder (symlink install)
REQUIRED = {  # folder -> (pattern, files that must be there)
    "launch": ("*.launch.py", {"policy.launch.py", "record.launch.py", "sim.launch.py"}),
    "calibration": ("*.yaml", {"blockpush_sim.yaml"}),
    "config": ("*.yaml", {"policy.yaml", "recorder.yaml", "sim.yaml"}),
}


def files(folder: str, pattern: str, required: set) -> list:
    """``folder/pattern`` relative to this folder (as setuptools and colcon want); exits when one is missing."""
    found = sorted(glob(os.path.join(here, folder, pattern)))
    missing = sorted(required - {os.path.basename(p) for p in found})
    if missing:
        link = os.path.join(here, folder)
        target = f" (a link to {os.readlink(link)!r})" if os.path.islink(link) else ""
        message = (f"{package_name}/setup.py: error: {', '.join(missing)} not found in {link}{target}: build the "
                   f"workspace of a full vqbet-ros clone, where {folder}/ is the repository's top-level folder")
        print(message, file=sys.stderr)
        # not SystemExit: colcon reads setup.py through distutils' run_setup(), which swallows it
        raise RuntimeError(message)
    return [os.path.relpath(p, here) for p in found]


setup(
    name=package_name,
    version="0.1.0",
    packages=[package_name],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{package_name}"]),
        (f"share/{package_name}", ["package.xml"]),
        (f"share/{package_name}/launch", files("launch", *REQUIRED["launch"])),
        (f"share/{package_name}/calibration", files("calibration", *REQUIRED["calibration"])),
        (f"share/{package_name}/config", files("config", *REQUIRED["config"]) + files("config", "*.xml", set())),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="vqbet-ros developers",
    maintainer_email="dev@vqbet-ros.invalid",
    description="Launch files, calibration files and default parameters of vqbet-ros",
    license="MIT",
)
