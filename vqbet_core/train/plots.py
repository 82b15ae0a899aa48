"""Loss curves from ``metrics.jsonl`` (one PNG per run, written at the end of training)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase, title in ((axes[0], 1, "phase 1: tokenizer"), (axes[1], 2, "phase 2: GPT")):
        rows = [r for r in records if r.get("phase") == phase]
        keys = sorted({k for r in rows for k in r if (k.endswith("loss") or k == "loss") and not k.startswith("usage")})
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        if keys:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
