"""Shared pieces of the launch tests: find ROS 2 (the one on PATH, or ../shared/ros2-jazzy-launch installed in
this venv), copy the workspace as a clean clone would have it, ``colcon build`` it, run ``ros2 launch`` as a
user does (own process group, like a terminal's foreground job), and watch the result with an independent
rclpy node."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the build command of docker/Dockerfile (test_docker_consistency checks that it still is)
COLCON_BUILD = ["colcon", "build", "--symlink-install"]
# what a clean clone brings to a build: the workspace and the top-level folders vqbet_bringup installs
CLONE_FOLDERS = ["ros2_ws/src", "launch", "calibration"]
# lines in a launch's output that mean a node did not end cleanly
BAD_OUTPUT = re.compile(r"Traceback|KeyboardInterrupt|process has died|escalating to|exit code -?[1-9]")


def find_ros2() -> tuple[dict | None, str]:
    """(environment with ``ros2`` and ``colcon``, description) or (None, why the launch tests skip)."""
    env = dict(os.environ)
    venv_bin = Path(sys.executable).parent
    on_path = shutil.which("ros2"), shutil.which("colcon")
    if all(on_path) and Path(on_path[0]).parent != venv_bin:
        return env, f"ROS 2 on PATH ({on_path[0]})"
    if (venv_bin / "ros2").exists() and (venv_bin / "colcon").exists():
        prefix = str(venv_bin.parent)
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
        env["AMENT_PREFIX_PATH"] = os.pathsep.join(p for p in (prefix, env.get("AMENT_PREFIX_PATH")) if p)
        return env, f"ros2-jazzy-launch installed in {prefix}"
    shared = REPO.parent / "shared" / "ros2-jazzy-launch"
    hint = (f"`make venv` installs {shared} into the venv" if shared.exists()
            else "no ../shared/ros2-jazzy-launch beside this clone")
    return None, f"no ROS 2: no `ros2` + `colcon` on PATH (source /opt/ros/jazzy/setup.bash) and none in this venv ({hint})"


def ros_env(env: dict) -> dict:
    """A private DDS domain on loopback for one test's processes (as tests/ros do)."""
    env = dict(env)
    env["ROS_DOMAIN_ID"] = str(random.randint(120, 230))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["RCUTILS_COLORIZED_OUTPUT"] = "0"
    return env


def copy_clone(dest: Path) -> Path:
    """The folders of a clean clone that a workspace build reads (symlinks kept as symlinks)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "install", "log")
    for folder in CLONE_FOLDERS:
        shutil.copytree(REPO / folder, dest / folder, symlinks=True, ignore=ignore)
    return dest


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def colcon_build(ws: Path, env: dict, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(COLCON_BUILD[:2] + args, cwd=ws, env=env, capture_output=True, text=True, timeout=300)


def sourced_env(setup_bash: Path, env: dict) -> dict:
    """The environment after ``source install/setup.bash``, as a user's shell has it."""
    out = subprocess.run(["bash", "-c", f'source "{setup_bash}" && env -0'], env=env, capture_output=True,
                         timeout=60, check=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def console_scripts(setup_py: Path) -> set[str]:
    return set(re.findall(r'"(\w+) = vqbet_ros\.\w+:main"', setup_py.read_text()))


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Launch:
    """``ros2 launch vqbet_bringup ...`` in its own process group, like a terminal's foreground job: the nodes
    are in the same group, so :meth:`interrupt` is what a Ctrl-C does (SIGINT to every process of the group)."""

    def __init__(self, args: list[str], env: dict, cwd: Path, log: Path):
        self.log = log
        with open(log, "wb") as out:
            # SIGINT / SIGTERM at their defaults, as in a terminal: a test run started in the background by a
            # non-interactive shell inherits SIGINT ignored, and ros2 launch then never saw a SIGINT sent to it alone
            self.proc = subprocess.Popen(["ros2", "launch", "vqbet_bringup", *args], env=env, cwd=cwd, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_default_signals)
        self.pgid = self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def interrupt(self, times: int = 1, gap: float = 0.05) -> float:
        """Ctrl-C ``times`` times, ``gap`` s apart (a second press lands while the nodes clean up); returns the
        time of the first.

        A press that comes only after every node has ended can reach ``ros2 launch`` itself after its event loop
        has restored Python's SIGINT handler: it then dies with -2 (upstream launch, not the nodes)."""
        start = time.monotonic()
        for i in range(times):
            if i:
                time.sleep(gap)
            self._killpg(signal.SIGINT)
        return start

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def _killpg(self, sig) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Whatever is left of the group: SIGKILL (a test that failed half-way leaves nothing running)."""
        if self.group_alive():
            self._killpg(signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)

    def assert_clean_exit(self, started: float, within: float = 10.0) -> float:
        """The launch and every node ended ``within`` s of ``started``, status 0, nothing unclean in the output."""
        code = self.wait(max(0.1, started + within - time.monotonic()))
        took = time.monotonic() - started
        out = self.output()
        assert code is not None, f"ros2 launch still running {within} s after the stop:\n{out[-3000:]}"
        assert code == 0, f"ros2 launch exited with {code}:\n{out[-3000:]}"
        end = time.monotonic() + 3.0
        while self.group_alive() and time.monotonic() < end:
            time.sleep(0.05)
        assert not self.group_alive(), f"processes of the launch outlived it:\n{out[-2000:]}"
        bad = sorted({m.group(0) for m in BAD_OUTPUT.finditer(out)})
        assert not bad, f"unclean shutdown ({bad}):\n{out[-3000:]}"
        return took


class Observer:
    """An independent rclpy node (own context, the test's domain): node names, topics, services, parameters."""

    def __init__(self, domain_id: int):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("launch_test_observer", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.messages: dict[str, list] = {}

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.05, max(0.0, end - time.monotonic())))

    def wait_for(self, what: str, predicate, timeout: float = 60.0, launch: Launch | None = None):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            if launch is not None and launch.proc.poll() is not None:
                raise AssertionError(f"ros2 launch ended ({launch.proc.returncode}) while waiting for {what}:\n"
                                     f"{launch.output()[-3000:]}")
            self.spin(0.1)
        tail = launch.output()[-3000:] if launch is not None else ""
        raise AssertionError(f"no {what} within {timeout} s\n{tail}")

    def node_names(self) -> set[str]:
        return {f"{ns.rstrip('/')}/{name}" for name, ns in self.node.get_node_names_and_namespaces()}

    def topics(self) -> dict[str, list[str]]:
        return dict(self.node.get_topic_names_and_types())

    def services(self) -> dict[str, list[str]]:
        return dict(self.node.get_service_names_and_types())

    def publishers(self, topic: str) -> set[str]:
        return {f"{i.node_namespace.rstrip('/')}/{i.node_name}" for i in self.node.get_publishers_info_by_topic(topic)}

    def subscribers(self, topic: str) -> set[str]:
        return {f"{i.node_namespace.rstrip('/')}/{i.node_name}" for i in self.node.get_subscriptions_info_by_topic(topic)}

    def parameters(self, node: str, names: list[str], timeout: float = 15.0) -> dict:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        client = self.node.create_client(GetParameters, f"{node}/get_parameters")
        try:
            self.wait_for(f"{node}/get_parameters", client.service_is_ready, timeout)
            future = client.call_async(GetParameters.Request(names=names))
            self.wait_for(f"{node}/get_parameters answer", future.done, timeout)
            return dict(zip(names, (parameter_value_to_python(v) for v in future.result().values)))
        finally:
            self.node.destroy_client(client)

    def lifecycle_state(self, node: str, timeout: float = 15.0) -> str:
        """A managed node's state label (``~/get_state``): unconfigured, inactive, active, finalized."""
        from lifecycle_msgs.srv import GetState

        client = self.node.create_client(GetState, f"{node}/get_state")
        try:
            self.wait_for(f"{node}/get_state", client.service_is_ready, timeout)
            future = client.call_async(GetState.Request())
            self.wait_for(f"{node}/get_state answer", future.done, timeout)
            return future.result().current_state.label
        finally:
            self.node.destroy_client(client)

    def trigger(self, service: str, timeout: float = 15.0):
        from std_srvs.srv import Trigger

        client = self.node.create_client(Trigger, service)
        try:
            self.wait_for(service, client.service_is_ready, timeout)
            future = client.call_async(Trigger.Request())
            self.wait_for(f"{service} answer", future.done, timeout)
            return future.result()
        finally:
            self.node.destroy_client(client)

    def listen(self, topic: str, msg_type, qos=10, json_data: bool = False) -> list:
        """Keep every message of ``topic`` (``json_data``: std_msgs/String payloads decoded)."""
        received = self.messages.setdefault(topic, [])
        decode = (lambda m: json.loads(m.data)) if json_data else (lambda m: m)
        self.node.create_subscription(msg_type, topic, lambda m: received.append(decode(m)), qos)
        return received

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.context)


def read_store(path: Path) -> dict:
    """A recorded store read back with plain zarr (no vqbet code): episode ends and every array's length."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    ends = [int(e) for e in root["meta/episode_ends"][:]]
    return {"episode_ends": ends, "lengths": {k: int(root["data"][k].shape[0]) for k in root["data"].array_keys()}}
