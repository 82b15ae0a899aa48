"""``card.md``: what an exported model was trained on, how well it did, how it was exported.

Written from ``model.yaml`` (so the card can never disagree with the metadata the runtime uses) plus
any evaluation results passed to ``vqbet export --eval-json``.
"""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def card_text(model: dict, eval_results: list[dict]) -> str:
    tr, ex, attrs = model["training"], model["export"], model.get("dataset_attrs") or {}
    cfg = tr.get("config") or {}
    parity = ex.get("parity", {})
    cams = ", ".join(f"{k} ({v['size'][0]}x{v['size'][1]}, crop {v['crop']})" for k, v in model["images"].items()) or "none"
    lowdim = ", ".join(f"{k} ({d})" for k, d in model["obs_dims"].items()) or "none"
    if not model["goal_dim"]:
        goal = "none"
    elif model["goal_names"]:
        goal = f"{model['goal_dim']}-d vector, named goals: {', '.join(model['goal_names'])}"
    else:
        goal = f"{model['goal_dim']}-d vector, no named goals (pass vectors)"
    gpt = cfg.get("gpt", {})
    lines = [
        f"# {model['name']}",
        "",
        f"{model['kind'].upper()} policy exported by vqbet {model['versions']['vqbet']} on {ex['created']}.",
        "",
        "## Inputs and outputs",
        f"- low-dim observations: {lowdim}",
        f"- cameras: {cams}",
        f"- history: {model['obs_window']} steps ({model['history_padding']})",
        f"- actions: {model['action_dim']} ({', '.join(model['joint_names'])}; names {model['joint_names_source']}), "
        f"chunks of {model['action_chunk']} at {_fmt(model['control_hz'])} Hz (control rate: {model['control_hz_source']})",
        f"- goal: {goal}",
        f"- codes: {model['codes']['layers']} layer(s) x {model['codes']['n_codes']}, sampling temperature {_fmt(model['sampling']['temperature'])}"
        f"{', secondary code given the primary' if model['codes']['sequential'] else ''}",
        "",
        "## Training",
        f"- run: `{tr['run']}` (config `{tr.get('config_name')}`), phase 1 {tr.get('phase1_step')} steps, phase 2 {tr.get('phase2_step')} steps",
        f"- model: GPT {gpt.get('n_layer')} layers / {gpt.get('n_head')} heads / width {gpt.get('n_embd')}",
        f"- data: `{tr.get('data_path')}` (hash {model.get('data_hash')}), {tr.get('n_train_episodes')} training + {tr.get('n_val_episodes')} validation episodes"
        + (f", source {attrs['source']}" if attrs.get("source") else ""),
    ]
    if tr.get("last_metrics"):
        lines.append("- last logged phase-2 metrics: " + ", ".join(f"{k} {_fmt(v)}" for k, v in tr["last_metrics"].items() if k != "step"))
    lines += ["", "## Evaluation"]
    if eval_results:
        for res in eval_results:
            lines.append("- `" + json.dumps(res, sort_keys=True) + "`")
    else:
        lines.append(f"- none recorded at export time; run `vqbet eval --model {model['name']} --env ENV --episodes N`")
    lines += [
        "",
        "## Export",
        f"- ONNX opset {ex['opset']}, {ex['exporter']}; files: " + ", ".join(f"{v['file']}" for v in model["files"].values()),
        f"- parity torch vs onnxruntime on {parity.get('steps')} steps with the same sampled codes: "
        f"max abs action error {_fmt(parity.get('max_abs_error'))} (target < {_fmt(parity.get('target'))}), "
        f"logits {_fmt(parity.get('logits_max_abs_error'))}, offsets {_fmt(parity.get('offsets_max_abs_error'))}"
        + (f", encoder {_fmt(parity['encoder_max_abs_error'])}" if "encoder_max_abs_error" in parity else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in model["versions"].items()),
    ]
    if ex.get("image_size_override"):
        lines += ["", "**Benchmark export**: the image size differs from the training size; do not deploy this folder."]
    lines += ["", "## Use", "```python", "from vqbet_core.runtime import PolicyRuntime",
              f"rt = PolicyRuntime('{model['name']}')  # TensorRT > CUDA > CPU as available",
              "rt.reset(" + (f"goal='{model['goal_names'][0]}'" if model["goal_names"] else "") + ")",
              "rt.observe(lowdim, images, stamp); chunk = rt.predict(now)", "```", ""]
    return "\n".join(lines)


def write_card(path: Path, model: dict, eval_results: list[dict]) -> None:
    Path(path).write_text(card_text(model, eval_results))
