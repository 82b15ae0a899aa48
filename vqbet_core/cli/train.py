"""``vqbet train``: phase 1 (tokenizer) then phase 2 (GPT), resumable; ``torchrun`` for multi-GPU."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="named config (e.g. multipath) or a YAML file")
    p.add_argument("--data", required=True, help="zarr dataset (DESIGN.md section 3)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--phase", choices=["all", "1", "2"], default="all", help="train both phases (default) or one")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out and start over")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start phase 2 from RUN's tokenizer, GPT, heads and normalizer (same architecture); "
                        "with --set train.offset_only_after=0 only the offset head trains")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default: config train.device)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.phase2_steps=2000 (repeatable)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="frozen-encoder feature cache (default $VQBET_CACHE/features, else ~/.cache/vqbet/features)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--joint-names", default=None, metavar="A,B,...",
                   help="action joint names, in action order, when the dataset has none (or others); kept in the "
                        "checkpoint for vqbet export, the dataset is not changed")
    p.add_argument("--control-hz", default=None, metavar="HZ",
                   help="control rate of the exported model when the dataset has no control_hz (default 10)")


def run(args) -> int:
    from vqbet_core.config import load_config, set_dotted, validate_config
    from vqbet_core.errors import ConfigError

    cfg = load_config(args.config)
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        set_dotted(cfg, key, value)
    if args.device:
        cfg["train"]["device"] = args.device
    validate_config(cfg, args.config)

    overrides = _check_dataset_metadata(args, cfg)

    import torch

    from vqbet_core.train.trainer import Trainer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    trainer = Trainer(cfg, args.data, args.out, fresh=args.fresh, progress=not args.no_progress, init_from=args.init_from,
                      cache_dir=args.cache_dir)
    trainer.meta["dataset_attrs"] = {**trainer.meta.get("dataset_attrs", {}), **overrides}
    meta = trainer.run(args.phase)
    if trainer.is_main:
        print(json.dumps({"run": str(args.out), "policy": cfg["policy"], "phase1_step": meta["phase1_step"],
                          "phase2_step": meta["phase2_step"], "data_hash": meta["data_hash"]}))
    return 0


def _check_dataset_metadata(args, cfg: dict) -> dict:
    """One warning line for missing joint_names / control_hz / camera metadata (vqbet_core.data.metadata);
    returns the attrs the options set."""
    import os
    import sys

    import numpy as np

    from vqbet_core.data.metadata import check_metadata, parse_control_hz, parse_joint_names
    from vqbet_core.data.store import ZarrDataset

    names, hz = parse_joint_names(args.joint_names), parse_control_hz(args.control_hz)
    ds = ZarrDataset.open(args.data, "r")
    dcfg = cfg["data"]
    action_dim = int(np.prod(ds.array(dcfg["action_key"]).shape[1:]))
    overrides, warning = check_metadata(ds.attrs, action_key=dcfg["action_key"], action_dim=action_dim,
                                        image_keys=list(dcfg.get("image_keys") or []), joint_names=names,
                                        control_hz=hz, where=str(args.data))
    if warning and os.environ.get("RANK", "0") == "0":
        print(warning, file=sys.stderr)
    return overrides
