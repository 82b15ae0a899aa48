"""The results rows: the runner runs a row from nothing and compares, the docs page is generated from the rows."""

import json
import shlex
from pathlib import Path

import pytest

from vqbet_core.benchmarks.reproduce import ROWS_FILE, load_rows, markdown
from vqbet_core.cli.main import build_parser
from vqbet_core.cli.main import main as vqbet

REPO = Path(__file__).resolve().parents[2]


def test_docs_page_is_generated_from_the_rows():
    page = REPO / "docs" / "reference" / "reproduce.md"
    assert page.read_text() == markdown(), (
        "docs/reference/reproduce.md is stale: python -m vqbet_core.benchmarks.reproduce --markdown > docs/reference/reproduce.md")


@pytest.mark.parametrize("name", sorted(load_rows()))
def test_every_step_parses_with_the_real_command_line(name):
    """A step that the vqbet parser rejects (a renamed option) fails here, not after an hour of training."""
    parser, _ = build_parser()
    for step in load_rows()[name]["steps"]:
        argv = shlex.split(step.format(out="/tmp/x"))
        assert argv[0] == "vqbet"
        parser.parse_args(argv[1:])


def test_a_tiny_row_runs_from_nothing_and_compares(tmp_path, capsys):
    rows = tmp_path / "rows.yaml"
    tiny = ("--set train.phase1_steps=3 --set train.phase2_steps=3 --set train.batch_size=16 "
            "--set train.phase1_batch_size=32 --set gpt.n_layer=1 --set gpt.n_head=2 --set gpt.n_embd=16 "
            "--set data.val_fraction=0.0")
    rows.write_text(json.dumps({"rows": {"tiny": {"title": "tiny multipath", "minutes": 1, "steps": [
        "vqbet sim-demos --env multipath --episodes 4 --out {out}/demos.zarr --no-progress",
        f"vqbet train --config multipath --data {{out}}/demos.zarr --out {{out}}/run --no-progress {tiny}",
        "vqbet eval --checkpoint {out}/run --env multipath --episodes 2 --max-steps 5"],
        "figures": [{"key": "episodes", "published": 2, "tolerance": 0},
                    {"key": "success", "published": 5.0, "tolerance": 0.1}]}}}))
    out = tmp_path / "row"
    code = vqbet(["reproduce", "tiny", "--rows", str(rows), "--out", str(out)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and not result["all_within"]  # success can never be 5.0: the comparison is real
    assert result["figures"][0] == {"key": "episodes", "measured": 2, "published": 2, "tolerance": 0, "within": True}
    assert (out / "run").is_dir() and (out / "demos.zarr").is_dir()
    # a second run skips the finished steps and evaluates again
    assert vqbet(["reproduce", "tiny", "--rows", str(rows), "--out", str(out)]) == 1
    assert "skip (exists)" in capsys.readouterr().err


def test_unknown_row_is_one_line(capsys):
    assert vqbet(["reproduce", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown results row 'nope'" in err and err.count("\n") == 1


def test_shipped_rows_file_is_the_one_in_the_package():
    assert ROWS_FILE.parent.name == "benchmarks" and ROWS_FILE.exists()
