"""The ``vqbet`` command: one entry point, one module per subcommand (imported only when used).

Every subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``. User errors are
``VqbetError``s and print as one line: ``error: <what is wrong>``, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vqbet_core.errors import VqbetError

SUBCOMMANDS = {
    "sim-demos": ("vqbet_core.cli.sim_demos", "scripted multimodal experts -> zarr dataset"),
    "train": ("vqbet_core.cli.train", "train VQ-BeT or BeT: phase 1 (tokenizer) then phase 2 (GPT); resumable"),
    "eval": ("vqbet_core.cli.eval", "roll out a checkpoint or exported model in simulation; prints one JSON line"),
    "pretrain-encoder": ("vqbet_core.cli.pretrain_encoder",
                         "ResNet-18 weights from a simulator's labelled frames (no ImageNet download needed)"),
    "export": ("vqbet_core.cli.export", "export a checkpoint to ONNX + model.yaml + card.md; reports parity"),
    "quantize": ("vqbet_core.cli.quantize", "int8 image encoder for a model folder, refused if it changes decisions"),
    "bag2zarr": ("vqbet_core.cli.bag2zarr", "convert ROS 2 bags (.db3 / .mcap) to a zarr dataset, no ROS needed"),
    "inspect": ("vqbet_core.cli.inspect", "episodes, lengths, keys and statistics of a zarr dataset"),
    "bench": ("vqbet_core.cli.bench", "latency and throughput benchmarks; prints JSON"),
    "reproduce": ("vqbet_core.cli.reproduce", "run a results row from nothing; prints measured vs published"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="vqbet", description="VQ-BeT for ROS 2 robot arms: data, training, export, evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_arguments(p)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 1
    if args.command not in modules:
        print(f"error: subcommand '{args.command}' is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except VqbetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
