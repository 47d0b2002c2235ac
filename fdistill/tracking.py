"""Experiment trackers (TensorBoard, Weights & Biases, Trackio, ...) through accelerate's tracking API.

``log.trackers: [tensorboard]`` sends the scalars of every metrics.jsonl row, the sample grids and the final
metrics to each tracker; none by default, and none needs installing for the default. A resumed run continues the
same tracker run: TensorBoard drops the events written after the checkpoint (``purge_step``), W&B and Trackio
resume the run id kept in ``<out>/tracker_id.txt``. TensorBoard's files go to ``<out>/trackers/fdistill/``.
"""

from __future__ import annotations

import importlib.util
import math
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

# tracker name (accelerate's) -> the module it needs
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
                   "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive",
                   "swanlab": "swanlab"}
PROJECT = "fdistill"


def check_trackers(names: list) -> str | None:
    """None when every name is a known tracker whose package is installed, else the problem in words."""
    for name in names:
        if name not in TRACKER_MODULES:
            return f"unknown tracker {name!r} (known: {', '.join(TRACKER_MODULES)})"
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            extra = " (pip install 'fdistill[tensorboard]')" if name == "tensorboard" else ""
            return f"tracker {name!r} needs the package {TRACKER_MODULES[name]!r}, which is not installed: " \
                   f"pip install {TRACKER_MODULES[name]}{extra}"
    return None


def accelerator_kwargs(names: list, run_dir: Path) -> dict:
    """What ``Accelerator(...)`` needs for the trackers (nothing when there are none)."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": list(names),
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "trackers"))}


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested config as the flat scalars trackers store as hyperparameters (lists as text)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v if v is not None else "none"
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def _run_id(run_dir: Path) -> str:
    path = Path(run_dir) / "tracker_id.txt"
    if path.is_file():
        return path.read_text().strip()
    rid = uuid.uuid4().hex[:12]
    path.write_text(rid + "\n")
    return rid


def start(accelerator, names: list, run_dir: Path, config: dict, step: int) -> None:
    """Open (or, from generator ``step`` > 0, resume) the tracker runs. Every process calls it."""
    if not names:
        return
    rid = _run_id(run_dir) if accelerator.is_main_process else ""
    name = f"{Path(run_dir).name}-{rid}"
    kwargs = {"tensorboard": {"purge_step": step + 1} if step > 0 else {},
              "wandb": {"name": name, "id": rid, "resume": "allow", "dir": str(run_dir)},
              "trackio": {"name": name, "resume": "allow"}}
    accelerator.init_trackers(PROJECT, config=_flat(config) if step == 0 else None,
                              init_kwargs={k: v for k, v in kwargs.items() if k in names})


def log_scalars(accelerator, names: list, values: dict, step: int, prefix: str = "") -> None:
    if names:
        accelerator.log({f"{prefix}{k}": float(v) for k, v in values.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
                         and math.isfinite(v)}, step=step)


def log_newest_grid(accelerator, names: list, run_dir: Path, step: int, since: float) -> None:
    """The newest ``samples*.png`` of the run directory written after ``since`` (a time), as image ``samples``."""
    if not names or not accelerator.is_main_process:
        return
    grids = [p for p in Path(run_dir).glob("samples*.png") if p.stat().st_mtime >= since]
    if not grids:
        return
    with Image.open(max(grids, key=lambda p: p.stat().st_mtime)) as im:
        img = np.asarray(im.convert("RGB"))[None]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": img}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"samples": list(img)}, step=step)
