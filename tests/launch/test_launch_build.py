"""``colcon build`` of ros2_ws as users run it: plain, ``--symlink-install`` (docker/Dockerfile's command) and with a
build base of another depth. Every variant must install every executable, launch file, parameter file, DDS
profile and calibration file - and write nothing outside its build, install and log folders - or fail loudly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _launch_support as L  # noqa: E402

pytestmark = [pytest.mark.launch, pytest.mark.timeout(300)]
SHARE = "vqbet_bringup/share/vqbet_bringup"


def _expected() -> dict[str, set[str]]:
    bringup = L.REPO / "ros2_ws/src/vqbet_bringup"
    return {
        f"{SHARE}/launch": {p.name for p in (L.REPO / "launch").glob("*.launch.py")},
        f"{SHARE}/calibration": {p.name for p in (L.REPO / "calibration").glob("*.yaml")},
        f"{SHARE}/config": {p.name for p in (bringup / "config").iterdir() if p.suffix in (".yaml", ".xml")},
        "vqbet_ros/lib/vqbet_ros": L.console_scripts(L.REPO / "ros2_ws/src/vqbet_ros/setup.py"),
    }


def _check_install(install: Path, env: dict) -> None:
    expected = _expected()
    assert {"policy.launch.py", "record.launch.py", "sim.launch.py"} <= expected[f"{SHARE}/launch"]
    assert "fastdds_large_images.xml" in expected[f"{SHARE}/config"] and "blockpush_sim.yaml" in expected[f"{SHARE}/calibration"]
    assert len(expected["vqbet_ros/lib/vqbet_ros"]) >= 4
    for folder, names in expected.items():
        for name in names:
            path = install / folder / name
            assert path.is_file(), f"not installed (or a dangling link): {path}"
            source = {"launch": L.REPO / "launch", "calibration": L.REPO / "calibration",
                      "config": L.REPO / "ros2_ws/src/vqbet_bringup/config"}.get(Path(folder).name)
            if source is not None:
                assert path.read_bytes() == (source / name).read_bytes(), f"{path} differs from {source / name}"
    # and ROS 2 itself finds them, as `ros2 launch` / `ros2 run` will
    sourced = L.sourced_env(install / "setup.bash", env)
    out = subprocess.run(["ros2", "pkg", "executables", "vqbet_ros"], env=sourced, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert {line.split()[1] for line in out.stdout.splitlines()} == expected["vqbet_ros/lib/vqbet_ros"]
    prefix = subprocess.run(["ros2", "pkg", "prefix", "--share", "vqbet_bringup"], env=sourced, capture_output=True,
                            text=True, timeout=60)
    assert Path(prefix.stdout.strip()).resolve() == (install / SHARE).resolve(), prefix.stderr


def test_docker_command_build(workspace, ros2_tools):
    """The session's build (docker/Dockerfile's ``colcon build --symlink-install`` in ros2_ws) installs everything."""
    _check_install(workspace["install"], ros2_tools)


@pytest.mark.parametrize("variant", ["plain", "symlink_deep_build_base"])
def test_colcon_variants_install_everything_and_nothing_elsewhere(variant, ros2_tools, tmp_path):
    root = tmp_path / "root"
    clone = L.copy_clone(root / "clone")
    ws = clone / "ros2_ws"
    if variant == "plain":
        args, install = [], ws / "install"
        outputs = ["clone/ros2_ws/build", "clone/ros2_ws/install", "clone/ros2_ws/log"]
    else:  # a build base two levels deeper than the default, outside the workspace (where the old setup.py failed)
        args = ["--symlink-install", "--build-base", str(root / "deep/er/build"), "--install-base", str(root / "inst")]
        install, outputs = root / "inst", ["deep/er/build", "inst", "clone/ros2_ws/log"]
    before = L.files_under(root)
    result = L.colcon_build(ws, ros2_tools, args)
    assert result.returncode == 0, f"colcon build {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    _check_install(install, ros2_tools)
    written = {f for f in L.files_under(root) - before if not any(f == o or f.startswith(o + "/") for o in outputs)}
    assert not written, f"colcon build {' '.join(args)} wrote outside its build/install/log folders: {sorted(written)[:10]}"


def test_package_without_the_top_level_folders_fails_loudly(ros2_tools, tmp_path):
    """vqbet_bringup copied without the repository around it: the build stops and names what is missing."""
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    for pkg in ("vqbet_ros", "vqbet_bringup"):  # symlinks copied as they are: dangling here
        subprocess.run(["cp", "-a", str(L.REPO / "ros2_ws/src" / pkg), str(ws / "src")], check=True)
    result = L.colcon_build(ws, ros2_tools, [])
    text = result.stdout + result.stderr
    assert result.returncode != 0, f"the build succeeded without the launch files:\n{text[-2000:]}"
    assert "policy.launch.py, record.launch.py, sim.launch.py not found in" in text, text[-3000:]
    assert not (ws / "install/vqbet_bringup/share/vqbet_bringup/launch").exists()
