"""The model card (``README.md`` with the Hugging Face metadata header) written into every export.

It says what the folder holds and how it was made: the teacher, the divergence, the recipe, the steps, the
metrics the run measured (``metrics.json`` of its run directory, if present) and how to load and sample it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

_PAPER = "https://arxiv.org/abs/2502.15681"


def _hub_id(teacher) -> str | None:
    """A teacher given as a hub id (``org/name``), not a local folder: the card's ``base_model``."""
    t = str(teacher or "")
    if t.count("/") == 1 and not os.path.exists(t) and not t.startswith((".", "/")):
        return t
    return None


def _run_metrics(source) -> dict:
    """``metrics.json`` of the run the checkpoint ``source`` belongs to (scalars only), or {}."""
    if not source:
        return {}
    src = Path(source)
    for folder in (src, src.parent):
        path = folder / "metrics.json"
        if path.is_file():
            try:
                m = json.loads(path.read_text())
            except ValueError:
                return {}
            return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {}


def render(*, kind: str, config: dict, meta: dict, usage: str) -> str:
    """The card's text. ``kind``: 'one-step' (OneStepPipeline) or 'sd' (StableDiffusionPipeline);
    ``config``: the run's config; ``meta``: what the export records (source, weights, gen_step, teacher ...)."""
    teacher = meta.get("teacher") or config.get("teacher")
    divergence = meta.get("divergence") or config.get("divergence")
    k = int(meta.get("num_steps") or meta.get("num_inference_steps") or 1)
    steps = "one-step" if k == 1 else f"{k}-step"
    header = {"library_name": "diffusers",
              "pipeline_tag": "text-to-image" if kind == "sd" else "unconditional-image-generation",
              "tags": ["fdistill", "f-distill", steps if k == 1 else "few-step", "diffusion-distillation",
                       f"divergence-{divergence}"]}
    base = _hub_id(teacher)
    if base:
        header["base_model"] = base
    sched = config.get("schedule") or {}
    recipe = config.get("recipe") or f"{sched.get('scheme', 'dmd2')} schedule, {sched.get('critic_per_gen', '?')} " \
                                      "critic updates per generator update"
    rows = [("teacher", teacher), ("divergence", divergence), ("recipe", recipe),
            ("task", meta.get("pipeline") or config.get("pipeline")), ("generator steps", meta.get("gen_step")),
            ("weights", meta.get("weights")), ("batch size per process", config.get("batch_size")),
            ("learning rate (generator)", (config.get("optim") or {}).get("lr_gen")),
            ("EMA decays", config.get("ema")), ("seed", config.get("seed")), ("checkpoint", meta.get("source"))]
    if k > 1:  # a few-step student (fdistill.student): its levels, one network evaluation each
        rows.insert(3, ("network evaluations per image", f"{k} (noise levels {meta.get('sigmas') or meta.get('timesteps')})"))
    metrics = _run_metrics(meta.get("source"))
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {steps.capitalize()} generator distilled with f-distill ({divergence})", "",
             f"A {steps} image generator distilled from the diffusion model `{teacher}` by f-divergence "
             f"distribution matching ([f-distill]({_PAPER}), Xu, Nie and Vahdat 2025) with the "
             f"`{divergence}` divergence, written by the `fdistill` package.", "",
             "## How it was trained", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "", [])]
    lines += ["", "## Measured", ""]
    if metrics:
        lines += ["Measured at the end of training by the run itself (`metrics.json`):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
    else:
        lines += ["No metrics were recorded with this run; `fdistill eval fid` measures them."]
    lines += ["", "## How to load and sample", "", "```python", usage.strip(), "```", "",
              "or from the command line: `fdistill sample FOLDER --num 64 --outdir samples/ --grid grid.png`.", ""]
    return "\n".join(lines)


def write(folder, *, kind: str, config: dict, meta: dict, usage: str) -> Path:
    """Write ``folder/README.md`` (the export's model card)."""
    path = Path(folder) / "README.md"
    path.write_text(render(kind=kind, config=config, meta=meta, usage=usage), encoding="utf-8")
    return path
