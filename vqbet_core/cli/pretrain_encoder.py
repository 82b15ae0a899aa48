"""``vqbet pretrain-encoder``: ResNet-18 weights learned from a simulator's frames, for ``vision.weights``.

For machines that cannot download ImageNet weights (see ``vqbet_core.vision.pretrain``). Writes
``--out`` (``.safetensors``: the trunk with its BatchNorm statistics) and ``--out`` + ``.json``
(held-out accuracy and how the weights were made), and prints that JSON as one line.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--env", required=True, help="a simulated env with pretraining labels (pusht_image, kitchen)")
    p.add_argument("--out", required=True, help="output weights file (.safetensors)")
    p.add_argument("--frames", type=int, default=20000, help="random-scene frames to render (default 20000)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="scene and training seed; runs are reproducible")
    p.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="env constructor argument, value parsed as YAML (e.g. image_size=96); repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    import time

    from vqbet_core.cli.sim_demos import _make_env, parse_env_args
    from vqbet_core.errors import VqbetError
    from vqbet_core.vision.encoder import save_encoder_weights
    from vqbet_core.vision.pretrain import collect_frames, pretrain_encoder

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise VqbetError(f"--out {out}: expected a .safetensors file name")
    if args.frames < 10 or args.steps < 1 or args.batch_size < 1 or not args.lr > 0:
        raise VqbetError(f"--frames must be >= 10, --steps and --batch-size >= 1, --lr > 0; got {args.frames}, "
                         f"{args.steps}, {args.batch_size}, {args.lr}")
    import torchvision  # noqa: F401  before the env: imported after MuJoCo's EGL context, torch's triton probe segfaults

    env_args = parse_env_args(args.env_arg)
    env = _make_env(args.env, env_args)
    try:
        t0 = time.perf_counter()
        images, labels = collect_frames(env, args.frames, seed=args.seed,  # checks the env can label frames
                                        progress=None if args.no_progress else f"frames {args.env}")
        label_names = list(env.pretrain_label_names)
        t_frames = time.perf_counter() - t0
    finally:
        env.close()
    t0 = time.perf_counter()
    encoder, metrics = pretrain_encoder(images, labels, args.steps, batch_size=args.batch_size, lr=args.lr,
                                        seed=args.seed, label_names=label_names,
                                        progress=None if args.no_progress else "pretrain resnet18")
    fingerprint = save_encoder_weights(encoder, out)
    report = {"env": args.env, "env_args": env_args, "image_size": [int(images.shape[2]), int(images.shape[1])],
              "seed": args.seed, "lr": args.lr, **metrics, "fingerprint": fingerprint,
              "frames_seconds": round(t_frames, 1), "train_seconds": round(time.perf_counter() - t0, 1),
              "out": str(out)}
    Path(str(out) + ".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0
