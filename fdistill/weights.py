"""Reading a finished checkpoint: the one API that export, the SD export, ``fdistill sample`` and
``task.init_from`` share.

- ``resolve_checkpoint(source)``: a ``ckpt-<step>`` folder as given, or the newest finished one of a run directory.
- ``weights_name(ckpt, which, cfg)``: which weights file. ``which="ema"`` means the weights training evaluated:
  the first EMA of the run's ``ema:`` list (the trainer evaluates and reports ``ema_<decays[0]>``), or the raw
  generator when the run kept no EMA.
- ``generator_state_dict`` / ``backbone_state_dict``: one prefix rule. Whatever wrapped the generator when it was
  saved (``module.`` of an AveragedModel or DDP, ``_orig_mod.`` of torch.compile) is stripped, with the
  AveragedModel's ``n_averaged`` counter; the backbone's weights are the keys under ``denoiser.backbone.``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import CheckpointError, check_finite, latest_checkpoint

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
BACKBONE_PREFIX = "denoiser.backbone."  # OneStepGenerator -> Denoiser -> the UNet


def resolve_checkpoint(source: str | os.PathLike, what: str = "") -> Path:
    """A ``ckpt-<step>`` folder (it holds meta.json), or the newest finished one of a run directory. ``what``
    names the setting in errors (e.g. 'task.init_from=')."""
    p = Path(source)
    label = f"{what}{p}" if what else str(p)
    if not p.exists():
        raise FileNotFoundError(f"{label}: no such file or folder")
    if (p / "meta.json").is_file():
        return p
    last = latest_checkpoint(p) if p.is_dir() else None
    if last is None:
        unfinished = sorted(x.name for x in p.glob("ckpt-*.tmp")) if p.is_dir() else []
        hint = (f" (only an unfinished {unfinished[-1]}: the run stopped while writing it; rerun its distill "
                "command to resume)" if unfinished else "")
        raise FileNotFoundError(f"no checkpoint in {label}{hint}: expected a run directory holding ckpt-<step>/ "
                                "folders with meta.json (written every log.ckpt_every steps and at the end of "
                                "`fdistill distill`), or one such folder")
    return last


def checkpoint_meta(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / "meta.json"
    try:
        return json.loads(path.read_text())
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def evaluated_ema(cfg: dict | None) -> str | None:
    """The EMA that training evaluates: the first of the config's ``ema`` decays, as a file stem; None without."""
    decays = (cfg or {}).get("ema") or []
    return f"ema_{float(decays[0]):g}" if decays else None


def weights_name(ckpt: str | os.PathLike, which: str = "ema", cfg: dict | None = None) -> str:
    """The weights file stem: 'ema' = the EMA training evaluated (``evaluated_ema``) or, for a run that kept none,
    the raw generator; 'generator'; or a stem such as 'ema_0.9999'. ``cfg`` defaults to the checkpoint's."""
    ckpt = Path(ckpt)
    have = sorted(p.stem for p in ckpt.glob("*.safetensors") if p.stem == "generator" or p.stem.startswith("ema_"))
    if which == "ema":
        if cfg is None:
            cfg = checkpoint_meta(ckpt).get("config") or {}
        evaluated = evaluated_ema(cfg)
        emas = [h for h in have if h.startswith("ema_")]
        # a config that names no EMA (or an older checkpoint missing its file) falls back to what is there
        name = evaluated if evaluated in have else (emas[0] if emas else "generator")
    else:
        name = which
    if not (ckpt / f"{name}.safetensors").is_file():
        raise FileNotFoundError(f"{ckpt} has no {name}.safetensors; generator weights there: {have or 'none'} "
                                "(--which ema | generator | one of these names)")
    return name


def load_weights(ckpt: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """``<ckpt>/<name>.safetensors`` as it was saved, with a clear error for a missing or corrupt file or for
    non-finite values."""
    path = Path(ckpt) / f"{name}.safetensors"
    if not path.is_file():
        have = sorted(x.stem for x in Path(ckpt).glob("*.safetensors") if not x.stem.startswith(("optim_", "rng_")))
        raise FileNotFoundError(f"{Path(ckpt)} has no {path.name}; it holds {have}")
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}. The file is corrupt; use another checkpoint") from None
    # weights a diverged run left would sample black images and export NaN: refused wherever weights are read
    check_finite(sd, str(path), "use an earlier checkpoint (ckpt-<step> folder) or retrain with lower learning rates")
    return sd


def unwrap_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's own keys from a wrapped save: wrapper prefixes stripped, AveragedModel's counter dropped."""
    out = {}
    for k, v in sd.items():
        if k == "n_averaged":
            continue
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def generator_state_dict(ckpt: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """The OneStepGenerator's state dict from ``<name>.safetensors`` (raw generator or an EMA)."""
    return unwrap_state_dict(load_weights(ckpt, name))


def backbone_state_dict(ckpt: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """The generator's backbone (its UNet) weights from ``<name>.safetensors``."""
    sd = generator_state_dict(ckpt, name)
    out = {k[len(BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(BACKBONE_PREFIX)}
    if not out:
        raise CheckpointError(f"{Path(ckpt) / (name + '.safetensors')} holds no generator UNet weights (keys "
                              f"'{BACKBONE_PREFIX}*', possibly under 'module.'); its first keys: {list(sd)[:4]}")
    return out
