"""The documentation stays true to the code: generated pages current, links whole, claims checked.

- The pages ``docs/generate.py`` writes (the ``vqbet`` command line, the nodes' parameters / topics /
  services / launch arguments, README.md's results table) equal what the script writes from the code now;
  a failure names the regenerate command.
- Every relative link in README.md and docs/ points to an existing file, and a ``#fragment`` into a
  Markdown file to one of its headings.
- The results file agrees with ``vqbet reproduce``'s rows where both publish a figure; the chart script runs.
- What the architecture page says about imports holds; the calibration example is the shipped file.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GENERATE = REPO / "docs" / "generate.py"
REGENERATE = ".venv/bin/python docs/generate.py"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stale(page: Path, text: str, what: str) -> str:
    import difflib

    old = page.read_text() if page.exists() else ""
    diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(page.relative_to(REPO)),
                                        "generated now", n=1))
    return (f"{page.relative_to(REPO)} differs from what docs/generate.py writes from the code now; "
            f"regenerate it with: {REGENERATE} {what}\n{diff[:3000]}")


# ---------------------------------------------------------------------------------------------- generated pages
def test_cli_reference_is_current():
    gen = _generator()
    text = gen.cli_page()
    assert gen.CLI_PAGE.exists() and gen.CLI_PAGE.read_text() == text, _stale(gen.CLI_PAGE, text, "cli")


def test_readme_results_table_is_current():
    gen = _generator()
    text = gen.readme_text()
    assert gen.README.read_text() == text, _stale(gen.README, text, "readme")


@pytest.mark.ros
@pytest.mark.timeout(600)
def test_nodes_reference_is_current(tmp_path):
    """Builds every node in a subprocess (rclpy, private ROS domain) and a tiny model for policy_node."""
    pytest.importorskip("rclpy")
    try:  # the repository's own launch/ folder is a namespace package named `launch`: ask for the real one
        from launch import LaunchDescription  # noqa: F401
    except ImportError:
        pytest.skip("the ROS 2 launch system is not installed (make venv installs ../shared/ros2-jazzy-launch "
                    "when it is beside the clone)")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(GENERATE), "--check", "nodes"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=560)
    if proc.returncode == 1 and "differs from the code" in proc.stdout:
        pytest.fail(proc.stdout[-4000:])
    assert proc.returncode == 0, f"docs/generate.py --check nodes failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------- links
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _prose_lines(text: str):
    """Lines outside fenced code blocks, with inline code removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, re.sub(r"`[^`]*`", "", line)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lowercase, punctuation dropped, spaces -> '-', repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower().replace("`", "")).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for page in _markdown_files():
        for number, line in _prose_lines(page.read_text()):
            for m in LINK.finditer(line):
                target = m.group(1) or m.group(2)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                path_part, _, fragment = target.partition("#")
                where = f"{page.relative_to(REPO)}:{number}: {target}"
                resolved = (page.parent / path_part).resolve() if path_part else page
                if not resolved.exists():
                    broken.append(f"{where} (no such file)")
                elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
                    broken.append(f"{where} (no heading #{fragment} in {resolved.relative_to(REPO)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_fits_on_two_screens():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (keep it under ~150: details go into docs/)"


# ---------------------------------------------------------------------------------------------- commands
def _vqbet_commands(text: str):
    """``vqbet ...`` lines of fenced code blocks, continuations joined, comments and ``[optional]`` parts dropped."""
    fenced, buf = False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced, buf = not fenced, ""
            continue
        if not fenced:
            continue
        line = "" if line.lstrip().startswith("#") else line.split(" #")[0].rstrip()
        if buf:
            buf += " " + line.strip()
        elif line.strip().startswith("vqbet "):
            buf = line.strip()
        else:
            continue
        if buf.endswith("\\"):
            buf = buf[:-1]
            continue
        yield re.sub(r"\[[^\]]*\]", "", buf)
        buf = ""


def test_every_vqbet_command_in_the_docs_parses():
    """Each ``vqbet`` command shown in README.md and docs/ (not the usage lines of the generated cli.md) is
    accepted by the real argument parsers, ``vqbet bench WHAT`` options included: a renamed or removed option
    fails here. Parsing only: nothing runs."""
    import argparse
    import shlex

    from vqbet_core.cli.main import build_parser

    class Refused(Exception):
        pass

    def refuse(self, message):
        raise Refused(f"{self.prog}: {message}")

    gen = _generator()
    parser, _ = build_parser()
    bench = {k: v for k, v in gen.bench_parsers().items() if not isinstance(v, str)}
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = refuse
    bad, count = [], 0
    try:
        for page in _markdown_files():
            if page == gen.CLI_PAGE:
                continue
            for command in _vqbet_commands(page.read_text()):
                count += 1
                try:
                    args = parser.parse_args(shlex.split(command)[1:])
                    if args.command == "bench" and args.what in bench:
                        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
                        bench[args.what].parse_args(rest)
                except (Refused, SystemExit) as exc:
                    bad.append(f"{page.relative_to(REPO)}: {command}\n    {exc}")
    finally:
        argparse.ArgumentParser.error = original
    assert count > 50, f"only {count} vqbet commands found in the docs: is the extraction broken?"
    assert not bad, "commands in the docs that vqbet refuses:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------- results
def test_results_file_agrees_with_the_reproduce_rows():
    results = yaml.safe_load((REPO / "docs" / "results.yaml").read_text())
    rows_file = REPO / "vqbet_core" / "benchmarks" / "rows.yaml"
    if not rows_file.exists():
        pytest.skip("no vqbet_core/benchmarks/rows.yaml")
    rows = yaml.safe_load(rows_file.read_text())["rows"]
    wrong = []
    for task in results["tasks"]:
        ref = task.get("reproduce")
        if not ref:
            continue
        for column, row_name in (("vqbet", ref.get("row")), ("bet", ref.get("bet_row"))):
            if not row_name or row_name not in rows:
                continue
            published = {f["key"]: f["published"] for f in rows[row_name].get("figures") or []}
            if ref["key"] in published and abs(published[ref["key"]] - task[column]) > 1e-9:
                wrong.append(f"{task['name']} {column}: docs/results.yaml {task[column]} vs rows.yaml "
                             f"{row_name}.{ref['key']} {published[ref['key']]}")
    assert not wrong, "docs/results.yaml and vqbet_core/benchmarks/rows.yaml disagree:\n" + "\n".join(wrong)


def test_results_file_has_the_kitchen_goal_place():
    names = [t["name"] for t in yaml.safe_load((REPO / "docs" / "results.yaml").read_text())["tasks"]]
    assert "kitchen_goal" in names


def test_chart_script_draws_the_results(tmp_path):
    pytest.importorskip("matplotlib")
    gen = _generator()
    for draw, name in ((gen.write_chart, "results.png"), (gen.write_latency_chart, "latency.png")):
        assert draw(tmp_path / name).stat().st_size > 10_000
        assert (REPO / "docs" / "images" / name).exists(), f"regenerate: {REGENERATE} chart"


# ---------------------------------------------------------------------------------------------- claims
def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


ROS_PACKAGES = {"rclpy", "launch", "launch_ros", "sensor_msgs", "std_msgs", "std_srvs", "trajectory_msgs",
                "diagnostic_msgs", "rcl_interfaces", "builtin_interfaces", "ament_index_python", "cv_bridge"}


def test_vqbet_core_never_imports_ros():
    offenders = [f"{p.relative_to(REPO)}: {sorted(_imported_modules(p) & ROS_PACKAGES)}"
                 for p in sorted((REPO / "vqbet_core").rglob("*.py")) if _imported_modules(p) & ROS_PACKAGES]
    assert not offenders, ("docs/explanation/architecture.md says vqbet_core never imports ROS; these do:\n"
                           + "\n".join(offenders))


def test_the_runtime_never_imports_torch():
    runtime = REPO / "vqbet_core" / "runtime"
    offenders = [str(p.relative_to(REPO)) for p in sorted(runtime.glob("*.py"))
                 if p.name != "bench.py" and "torch" in _imported_modules(p)]  # bench compares against torch
    assert not offenders, "the runtime must run without torch (model folder -> onnxruntime only): " + ", ".join(offenders)


def test_calibration_example_is_the_shipped_file():
    page = (REPO / "docs" / "reference" / "calibration.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", page, re.S).group(1)
    assert block == (REPO / "calibration" / "franka_sim.yaml").read_text(), \
        "docs/reference/calibration.md's example differs from calibration/franka_sim.yaml: copy the file into the page"
