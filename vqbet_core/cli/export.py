"""``vqbet export``: checkpoint -> model folder (policy.onnx [+ encoder.onnx], model.yaml, card.md); reports parity."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder written by vqbet train")
    p.add_argument("--out", required=True, help="model folder to write (replaced if it is an earlier export)")
    p.add_argument("--name", default=None, help="model name in model.yaml and card.md (default: the folder name)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--parity-steps", type=int, default=16, help="observation steps compared torch vs onnxruntime")
    p.add_argument("--max-error", type=float, default=1e-3,
                   help="fail when the max abs action error torch vs onnxruntime is above this (target: < 1e-4)")
    p.add_argument("--eval-json", action="append", default=[], metavar="FILE",
                   help="JSON lines printed by vqbet eval, copied into card.md (repeatable)")
    p.add_argument("--seed", type=int, default=0)


def _read_eval(paths: list[str]) -> list[dict]:
    from pathlib import Path

    from vqbet_core.errors import VqbetError

    out = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise VqbetError(f"--eval-json {path}: file not found")
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    raise VqbetError(f"--eval-json {path}: line {n} is not JSON") from None
    return out


def run(args) -> int:
    from vqbet_core.export.onnx_export import export_model

    report = export_model(args.checkpoint, args.out, name=args.name, opset=args.opset, parity_steps=args.parity_steps,
                          max_error=args.max_error, seed=args.seed, eval_results=_read_eval(args.eval_json))
    print(json.dumps(report))
    return 0
