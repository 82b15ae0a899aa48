"""``make demo-multipath``: the multimodal-learning check, end to end.

Multipath point mass (BeT paper, appendix A): scripted 2-route demonstrations -> train VQ-BeT and a
plain MSE policy (BeT with one bin) -> closed-loop evaluation -> one JSON line per policy and a plot
of the rollouts. VQ-BeT keeps both routes; the MSE policy averages them into the obstacle.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vqbet_core.cli.main import main as vqbet


def run_step(argv: list[str]) -> None:
    print("$ vqbet " + " ".join(argv), flush=True)
    code = vqbet(argv)
    if code:
        sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqbet_core.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    # 1000 demos: with 100, where rollouts reach the fork the route probability rests on a handful of nearby
    # demos and the route frequencies swing by seed (0.11 .. 1.00 up, demos 0.60); with 1000, 4/4 seeds within 0.15
    p.add_argument("--episodes", type=int, default=1000, help="demonstrations to generate")
    p.add_argument("--eval-episodes", type=int, default=100)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"multipath_{args.episodes}.zarr"
    if not data.exists():
        run_step(["sim-demos", "--env", "multipath", "--episodes", str(args.episodes), "--out", str(data), "--seed", "0"])
    run_step(["train", "--config", "multipath", "--data", str(data), "--out", str(out / "vqbet"), "--fresh"])
    run_step(["train", "--config", "multipath", "--data", str(data), "--out", str(out / "mse"), "--fresh",
              "--set", "policy=bet", "--set", "bet.n_bins=1"])
    for name in ("vqbet", "mse"):
        run_step(["eval", "--checkpoint", str(out / name), "--env", "multipath", "--episodes", str(args.eval_episodes),
                  "--plot", str(out / f"rollouts_{name}.png")])
    print(json.dumps({"demo": "multipath", "plots": [str(out / "rollouts_vqbet.png"), str(out / "rollouts_mse.png")],
                      "loss_curves": [str(out / "vqbet" / "loss.png"), str(out / "mse" / "loss.png")]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
