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
    p.add_argument("--joint-names", default=None, metavar="A,B,...",
                   help="joint names for model.yaml, in action order, when the training data had none (or others)")
    p.add_argument("--control-hz", default=None, metavar="HZ",
                   help="control rate for model.yaml when the training data had no control_hz (default 10)")


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


def _check_metadata(args) -> dict:
    """One warning line for metadata the training data lacked (vqbet_core.data.metadata); returns the overrides."""
    import sys

    from vqbet_core.data.metadata import check_metadata, parse_control_hz, parse_joint_names
    from vqbet_core.train.checkpoint import load_meta

    names, hz = parse_joint_names(args.joint_names), parse_control_hz(args.control_hz)
    _, meta = load_meta(args.checkpoint)
    overrides, warning = check_metadata(meta.get("dataset_attrs") or {}, action_key=meta.get("action_key", "action"),
                                        action_dim=int(meta["action_dim"]), image_keys=meta.get("image_keys") or [],
                                        joint_names=names, control_hz=hz, where="the training data")
    if warning:
        print(warning, file=sys.stderr)
    return overrides


def run(args) -> int:
    from vqbet_core.export.onnx_export import export_model

    overrides = _check_metadata(args)
    report = export_model(args.checkpoint, args.out, name=args.name, opset=args.opset, parity_steps=args.parity_steps,
                          max_error=args.max_error, seed=args.seed, eval_results=_read_eval(args.eval_json),
                          metadata=overrides)
    print(json.dumps(report))
    return 0
