"""``vqbet quantize MODEL --data D.zarr``: an int8 image encoder, kept only if it keeps the policy's decisions."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("model", help="exported model folder with an image encoder")
    p.add_argument("--data", required=True, help="the training dataset (zarr): calibration and held-out frames")
    p.add_argument("--frames", type=int, default=200, help="calibration frames")
    p.add_argument("--holdout", type=int, default=300, help="held-out frames for the decision check")
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="refuse when the argmax codes agree with fp32 on fewer held-out frames than this")
    p.add_argument("--min-cosine", type=float, default=0.98, help="refuse below this feature cosine (worst frame)")
    p.add_argument("--method", choices=["minmax", "percentile", "entropy"], default="minmax",
                   help="activation calibration (onnxruntime's calibrators)")
    p.add_argument("--keep-ends-fp32", action="store_true", help="leave the first and the last convolution in fp32")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from vqbet_core.export.quantize import quantize_encoder

    report = quantize_encoder(args.model, args.data, frames=args.frames, holdout=args.holdout,
                              min_agreement=args.min_agreement, min_cosine=args.min_cosine, seed=args.seed,
                              method=args.method, keep_ends_fp32=args.keep_ends_fp32)
    print(json.dumps(report))
    return 0
