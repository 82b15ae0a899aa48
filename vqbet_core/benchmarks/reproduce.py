"""Run a results row from nothing and compare its figures with the published ones (``vqbet reproduce``).

Why a file of rows: a figure in the README is only worth its command. ``rows.yaml`` holds, per row, the
commands in order and the figures with their tolerances; the runner executes them (each step whose
output already exists is skipped, so an interrupted row resumes), reads the last JSON line of the final
step (``vqbet eval``) and prints one JSON line: measured vs published, and whether each is within its
tolerance. The docs page of the commands is generated from the same file, so they cannot drift.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from vqbet_core.errors import VqbetError

ROWS_FILE = Path(__file__).with_name("rows.yaml")


def load_rows(path: str | Path | None = None) -> dict:
    path = Path(path) if path else ROWS_FILE
    try:
        rows = (yaml.safe_load(path.read_text()) or {}).get("rows")
    except (OSError, yaml.YAMLError) as exc:
        raise VqbetError(f"{path}: cannot read the results rows ({str(exc).splitlines()[0]})") from None
    if not isinstance(rows, dict) or not rows:
        raise VqbetError(f"{path}: expected a mapping 'rows: {{NAME: {{steps: [...], figures: [...]}}}}'")
    for name, row in rows.items():
        if not isinstance(row, dict) or not isinstance(row.get("steps"), list) or not row["steps"]:
            raise VqbetError(f"{path}: row '{name}' needs a non-empty list of steps")
        for fig in row.get("figures") or []:
            if not {"key", "published", "tolerance"} <= set(fig):
                raise VqbetError(f"{path}: row '{name}': each figure needs key, published and tolerance, got {fig}")
    return rows


def _output_of(argv: list[str]) -> str | None:
    """The path a step writes (``--out``), so a finished step can be skipped; None for eval steps."""
    if "--out" in argv:
        return argv[argv.index("--out") + 1]
    return None


def _lookup(metrics: dict, key: str):
    node = metrics
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_row(name: str, out: str | Path | None = None, rows_file: str | Path | None = None,
            log=print) -> dict:
    rows = load_rows(rows_file)
    if name not in rows:
        raise VqbetError(f"unknown results row '{name}' (rows: {', '.join(rows)})")
    row = rows[name]
    out = Path(out or Path("runs/reproduce") / name)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics, times = None, []
    for step in row["steps"]:
        argv = shlex.split(step.format(out=out))
        if argv[0] != "vqbet":
            raise VqbetError(f"row '{name}': steps must be vqbet commands, got {step!r}")
        target = _output_of(argv)
        if target is not None and Path(target).exists():
            log(f"[reproduce {name}] skip (exists): {' '.join(argv)}")
            continue
        log(f"[reproduce {name}] run: {' '.join(argv)}")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vqbet_core.cli.main", *argv[1:]], stdout=subprocess.PIPE,
                              text=True)
        times.append({"step": " ".join(argv[:2]), "minutes": round((time.perf_counter() - t) / 60, 2)})
        if proc.returncode != 0:
            raise VqbetError(f"row '{name}': step failed with status {proc.returncode}: {' '.join(argv)}")
        lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
        if lines:
            metrics = json.loads(lines[-1])
    if metrics is None:
        raise VqbetError(f"row '{name}': no step printed a JSON line of metrics")
    figures = []
    for fig in row.get("figures") or []:
        measured = _lookup(metrics, fig["key"])
        ok = measured is not None and abs(float(measured) - float(fig["published"])) <= float(fig["tolerance"])
        figures.append({"key": fig["key"], "measured": measured, "published": fig["published"],
                        "tolerance": fig["tolerance"], "within": bool(ok)})
    return {"row": name, "figures": figures, "all_within": all(f["within"] for f in figures),
            "minutes": round((time.perf_counter() - t0) / 60, 2), "step_minutes": times, "metrics": metrics}


def markdown(rows_file: str | Path | None = None) -> str:
    """The docs page: every row's commands and published figures (generated; do not edit by hand)."""
    rows = load_rows(rows_file)
    lines = ["# Reproducing the results", "",
             "Generated from `vqbet_core/benchmarks/rows.yaml` by "
             "`python -m vqbet_core.benchmarks.reproduce --markdown > docs/reference/reproduce.md`; do not edit.",
             "`vqbet reproduce ROW` runs a row from nothing (`{out}` = `runs/reproduce/ROW`) and prints measured vs "
             "published. Times are for a 2-core CPU, alone.", ""]
    for name, row in rows.items():
        lines += [f"## {name}", "", f"{row.get('title', name)}. About {row.get('minutes', '?')} min ({row.get('kind', '')}).", "",
                  "```bash", *[s for s in row["steps"]], "```", ""]
        figs = row.get("figures") or []
        if figs:
            lines += ["| figure | published | tolerance |", "|---|---|---|"]
            lines += [f"| `{f['key']}` | {f['published']} | ±{f['tolerance']} |" for f in figs]
        else:
            lines += ["No published figure yet."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(markdown())
    else:
        print("usage: python -m vqbet_core.benchmarks.reproduce --markdown", file=sys.stderr)
        sys.exit(2)
