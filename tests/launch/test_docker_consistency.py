"""docker/Dockerfile and docker/compose.yaml against what the launch tests build and run (no Docker engine here, so
the image itself is never built in tests): the same colcon command in ros2_ws, the folders the build needs copied,
SIGINT as the stop signal, and every ``ros2 launch vqbet_bringup X ...`` they start names an installed launch file,
passes every argument that has no default and no argument that the file does not declare (asked of the real
``ros2 launch --show-args`` on the session's build)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import _launch_support as L  # noqa: E402

pytestmark = [pytest.mark.launch, pytest.mark.timeout(120)]
DOCKERFILE = L.REPO / "docker/Dockerfile"
COMPOSE = L.REPO / "docker/compose.yaml"


def _launch_arguments(env: dict, launch_file: str) -> dict[str, bool]:
    """name -> has a default, from ``ros2 launch vqbet_bringup FILE --show-args``."""
    out = subprocess.run(["ros2", "launch", "vqbet_bringup", launch_file, "--show-args"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    args: dict[str, bool] = {}
    name = None
    for line in out.stdout.splitlines():
        match = re.match(r"^    '(\w+)':$", line)
        if match:
            name = match.group(1)
            args[name] = False
        elif name and line.strip().startswith("(default:"):
            args[name] = True
    assert args, out.stdout
    return args


def _docker_launches() -> list[tuple[str, list[str]]]:
    """(where, ros2 launch command words) of the Dockerfile's CMD and every compose service."""
    text = DOCKERFILE.read_text()
    cmd = re.search(r"^CMD (\[.*?\])$", text.replace("\\\n", ""), re.M | re.S)
    assert cmd, "no CMD in docker/Dockerfile"
    found = [("Dockerfile CMD", yaml.safe_load(cmd.group(1)))]
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        words = shlex.split(re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", service["command"]))
        found.append((f"compose service {name}", words))
    return found


def test_dockerfile_builds_the_workspace_as_the_tests_do():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    builds = re.findall(r"cd ros2_ws && (colcon build[^&\n]*?)\s*(?:&&|$)", text, re.M)
    assert builds == [" ".join(L.COLCON_BUILD)], builds
    copied = set(re.findall(r"^COPY (\S+) \./\S+$", text, re.M))
    for folder in L.CLONE_FOLDERS:  # what the workspace build reads (launch/ and calibration/ through symlinks)
        assert folder.split("/")[0] in copied, f"the Dockerfile does not COPY {folder}"
    assert re.search(r"^STOPSIGNAL SIGINT$", text, re.M), "docker stop must send SIGINT (ros2 launch's clean stop)"
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        assert service.get("stop_signal") == "SIGINT", f"compose service {name}: stop_signal"


def test_docker_launch_commands_match_the_launch_files(workspace):
    launches = _docker_launches()
    assert len(launches) >= 3
    for where, words in launches:
        assert words[:3] == ["ros2", "launch", "vqbet_bringup"], (where, words)
        launch_file, given = words[3], dict(w.split(":=", 1) for w in words[4:])
        assert (L.REPO / "launch" / launch_file).exists(), f"{where}: no launch/{launch_file}"
        declared = _launch_arguments(workspace["env"], launch_file)
        assert set(given) <= set(declared), f"{where}: {sorted(set(given) - set(declared))} not declared by {launch_file}"
        missing = sorted(n for n, has_default in declared.items() if not has_default and n not in given)
        assert not missing, f"{where}: {launch_file} needs {missing}"
