"""``vqbet reproduce ROW``: run a results row from nothing; prints measured vs published as one JSON line."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("row", nargs="?", help="results row (see --list)")
    p.add_argument("--list", action="store_true", help="list the rows with their times")
    p.add_argument("--out", help="folder for the row's demos, run and results (default runs/reproduce/ROW)")
    p.add_argument("--rows", help="rows file (default: the shipped vqbet_core/benchmarks/rows.yaml)")


def run(args) -> int:
    from vqbet_core.benchmarks.reproduce import load_rows, run_row
    from vqbet_core.errors import VqbetError

    if args.list or not args.row:
        for name, row in load_rows(args.rows).items():
            print(f"{name:18s} ~{row.get('minutes', '?')} min  {row.get('title', '')}")
        return 0 if args.list else 1
    if args.row not in load_rows(args.rows):
        raise VqbetError(f"unknown results row '{args.row}' (rows: {', '.join(load_rows(args.rows))})")
    result = run_row(args.row, args.out, args.rows, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result))
    return 0 if result["all_within"] else 1
