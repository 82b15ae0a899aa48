"""``vqbet inspect``: what is in a dataset, before spending an hour training on it.

Validates the store first (so a broken dataset gives the one-line ``DatasetError``), then reports
episodes and lengths, every key's per-step shape and dtype, per-feature statistics of the low-dim keys,
behaviour-mode frequencies (``.zattrs["episode_modes"]``) and the other attributes. ``--plot`` saves a
histogram of episode lengths and, for image datasets, a contact sheet of the first camera.

``--tokens RUN`` asks a trained run's action tokenizer (VQ-BeT codes, BeT bins) which tokens the chunks at
the first steps of each episode get, grouped by the episode's first decision (its mode label up to the first
``>`` or ``,``). Why: a policy can only choose among modes its tokens tell apart. When several first decisions
share one token at the start, offsets trained on sampled codes decode that token to one median action and
every rollout takes the same branch (measured on kitchen: five first tasks in the demos, one in 0.93 of
rollouts, all five first actions in one primary code).
"""

from __future__ import annotations

import json

_MAX_TEXT_FEATURES = 8  # wider keys are summarised in the text report (the JSON has every feature)
_LONG_LIST = 20


def add_arguments(p) -> None:
    p.add_argument("dataset", help="zarr dataset folder (D.zarr)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--plot", metavar="OUT.png", help="save episode-length histogram (+ first camera contact sheet)")
    p.add_argument("--tokens", metavar="RUN", help="run folder (vqbet train): tokens of each mode's first action chunks")
    p.add_argument("--token-steps", default="0,2,5", help="episode steps whose chunks --tokens encodes (default 0,2,5)")


def _stats(values) -> dict:
    import numpy as np

    flat = np.asarray(values, np.float64).reshape(len(values), -1)
    return {name: [round(float(x), 6) for x in fn(flat, axis=0)]
            for name, fn in (("min", np.min), ("max", np.max), ("mean", np.mean), ("std", np.std))}


def _attr_summary(attrs: dict) -> dict:
    """Attributes without the per-episode lists (summarised elsewhere or too long to print)."""
    out = {}
    for key, value in sorted(attrs.items()):
        if key == "episode_modes":
            continue
        if isinstance(value, list) and len(value) > _LONG_LIST:
            value = f"<list of {len(value)}>"
        out[key] = value
    return out


def summarize_dataset(ds) -> dict:
    """Everything the report shows, as a JSON-able dict."""
    import numpy as np

    from vqbet_core.data.store import is_image_key
    from vqbet_core.sim.base import mode_frequencies

    lengths = np.diff(np.concatenate([[0], ds.episode_ends]))
    keys = {}
    for key in ds.keys:
        arr = ds.array(key)
        info = {"shape": list(arr.shape[1:]), "dtype": str(arr.dtype), "image": is_image_key(key)}
        if not info["image"]:
            info["stats"] = _stats(ds.read(key))
        keys[key] = info
    report = {
        "path": str(ds.path),
        "episodes": ds.n_episodes,
        "steps": ds.n_steps,
        "length": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 3), "max": int(lengths.max())},
        "keys": keys,
        "mode_freq": None,
        "mode_counts": None,
        "attrs": _attr_summary(ds.attrs),
    }
    modes = ds.attrs.get("episode_modes")
    if isinstance(modes, list) and modes:
        modes = modes[: ds.n_episodes]
        report["mode_freq"] = {k: round(v, 6) for k, v in mode_frequencies(modes).items()}
        labels = ["none" if m is None else m for m in modes]
        report["mode_counts"] = {k: labels.count(k) for k in report["mode_freq"]}
    return report


def first_decision_tokens(ds, run_dir: str, steps=(0, 2, 5)) -> dict:
    """Per step: for each first decision, its most common token and that token's share, plus how many
    decisions have a top token of their own (``distinct`` of ``decisions``)."""
    import re
    from collections import Counter

    import numpy as np
    import torch

    from vqbet_core.errors import VqbetError
    from vqbet_core.train.checkpoint import load_policy

    modes = ds.attrs.get("episode_modes")
    if not isinstance(modes, list) or not any(modes):
        raise VqbetError(f"{ds.path}: no episode_modes in .zattrs: --tokens groups episodes by their mode label")
    policy, normalizer, _, meta, _ = load_policy(run_dir)
    key = meta.get("action_key", "action")
    if key not in ds.keys:
        raise VqbetError(f"{ds.path}: no '{key}' array (the run {run_dir} was trained on '{key}')")
    chunk = int(policy.action_chunk)
    actions = ds.read(key)
    starts = np.concatenate([[0], ds.episode_ends[:-1]])
    lengths = np.diff(np.concatenate([[0], ds.episode_ends]))
    decision = [re.split(r"[>,]", str(m))[0].strip() if m else "none" for m in modes[: ds.n_episodes]]
    out = {"run": str(run_dir), "kind": meta.get("kind"), "action_chunk": chunk, "steps": {}}
    for step in steps:
        rows = [i for i in range(ds.n_episodes) if lengths[i] >= step + chunk]
        if not rows:
            continue
        windows = np.stack([actions[starts[i] + step: starts[i] + step + chunk] for i in rows]).astype(np.float32)
        norm = normalizer.normalize(key, windows.reshape(-1, windows.shape[-1])).reshape(len(rows), -1)
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(norm, dtype=np.float32))
            codes = policy.tokenizer.encode(x) if hasattr(policy, "tokenizer") else policy.nearest_bin(x)[:, None]
        tokens = [tuple(int(c) for c in row) for row in codes.reshape(len(rows), -1).cpu().numpy()]
        groups: dict[str, Counter] = {}
        for i, tok in zip(rows, tokens):
            groups.setdefault(decision[i], Counter())[tok] += 1
        top = {d: c.most_common(1)[0] for d, c in sorted(groups.items())}
        tops = Counter(tok for tok, _ in top.values())
        out["steps"][str(step)] = {
            "decisions": len(top),
            "distinct": sum(1 for tok, _ in top.values() if tops[tok] == 1),
            "top_token": {d: {"token": list(tok), "share": round(n / sum(groups[d].values()), 3)}
                          for d, (tok, n) in top.items()},
        }
    return out


def format_tokens(t: dict) -> str:
    lines = [f"tokens of {t['run']} ({t['kind']}, chunk {t['action_chunk']}) by first decision"]
    for step, row in t["steps"].items():
        lines.append(f"  step {step}: {row['distinct']} of {row['decisions']} first decisions have a token of their own")
        for d, info in row["top_token"].items():
            lines.append(f"    {d}: {tuple(info['token'])} in {info['share']:.2f} of its episodes")
    return "\n".join(lines)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def format_report(r: dict) -> str:
    lines = [
        f"dataset  {r['path']}",
        f"episodes {r['episodes']}   steps {r['steps']}   length min/mean/max "
        f"{r['length']['min']}/{r['length']['mean']:.1f}/{r['length']['max']}",
        "keys",
    ]
    width = max(len(k) for k in r["keys"]) if r["keys"] else 0
    for key, info in r["keys"].items():
        head = f"  {key:<{width}}  {info['dtype']:<8} {tuple(info['shape'])!s:<14}"
        if info["image"]:
            lines.append(f"{head} image")
            continue
        s = info["stats"]
        if len(s["min"]) <= _MAX_TEXT_FEATURES:
            lines.append(f"{head} min {_fmt(s['min'])} max {_fmt(s['max'])} mean {_fmt(s['mean'])} std {_fmt(s['std'])}")
        else:
            lines.append(f"{head} {len(s['min'])} features: min {min(s['min']):.4g} max {max(s['max']):.4g} "
                         f"mean of means {sum(s['mean']) / len(s['mean']):.4g} mean std {sum(s['std']) / len(s['std']):.4g}"
                         " (per feature: --json)")
    if r["mode_freq"]:
        lines.append("modes (episode_modes)")
        for mode, freq in r["mode_freq"].items():
            lines.append(f"  {mode}: {freq:.3f} ({r['mode_counts'][mode]})")
    lines.append("attrs")
    for key, value in r["attrs"].items():
        text = json.dumps(value, default=str)
        lines.append(f"  {key}: {text if len(text) <= 100 else text[:97] + '...'}")
    return "\n".join(lines)


def save_plot(ds, out_png: str) -> None:
    """Histogram of episode lengths, plus a contact sheet of the first camera when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from vqbet_core.data.store import is_image_key

    lengths = np.diff(np.concatenate([[0], ds.episode_ends]))
    cameras = [k for k in ds.keys if is_image_key(k)]
    sheet = _contact_sheet(ds, cameras[0]) if cameras else None
    sheet_h = 0.0 if sheet is None else 8.0 * sheet.shape[0] / sheet.shape[1] + 0.4  # keep the frames' aspect
    fig, axes = plt.subplots(1 if sheet is None else 2, 1, figsize=(8, 3 + sheet_h), squeeze=False,
                             gridspec_kw={"height_ratios": [3] if sheet is None else [3, sheet_h]})
    ax = axes[0, 0]
    ax.hist(lengths, bins=min(30, max(5, len(np.unique(lengths)))), color="tab:blue")
    ax.set_xlabel("episode length (steps)")
    ax.set_ylabel("episodes")
    ax.set_title(f"{ds.path.name}: {ds.n_episodes} episodes, {ds.n_steps} steps")
    if sheet is not None:
        ax2 = axes[1, 0]
        ax2.imshow(sheet)
        ax2.set_axis_off()
        ax2.set_title(f"{cameras[0]}: rows = episodes, columns = start .. end")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _contact_sheet(ds, key: str, episodes: int = 6, columns: int = 6):
    """Evenly spaced frames (columns) of the first few episodes (rows), as one RGB image."""
    import numpy as np

    slices = ds.episode_slices()[:episodes]
    arr = ds.array(key)
    rows = []
    for sl in slices:
        idx = np.linspace(sl.start, sl.stop - 1, columns).astype(int)
        rows.append(np.concatenate([np.asarray(arr[i]) for i in idx], axis=1))
    return np.concatenate(rows, axis=0)


def run(args) -> int:
    from vqbet_core.data.store import ZarrDataset

    ds = ZarrDataset.open(args.dataset, "r")
    ds.validate()
    report = summarize_dataset(ds)
    if args.plot:
        save_plot(ds, args.plot)
        report["plot"] = args.plot
    text = format_report(report)
    if args.tokens:
        from vqbet_core.errors import VqbetError

        try:
            steps = [int(x) for x in str(args.token_steps).split(",") if x.strip()]
        except ValueError:
            raise VqbetError(f"--token-steps {args.token_steps!r}: expected comma-separated step numbers, e.g. 0,2,5") from None
        report["tokens"] = first_decision_tokens(ds, args.tokens, steps)
        text += "\n" + format_tokens(report["tokens"])
    print(json.dumps(report, default=str) if args.json else text)
    return 0
