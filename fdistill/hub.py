"""The Hugging Face hub, offline-first: ``from_pretrained`` keyword arguments that never contact the hub for a
local folder or when ``HF_HUB_OFFLINE`` is set."""

from __future__ import annotations

import os
from pathlib import Path


def offline() -> bool:
    try:
        from huggingface_hub import constants  # heavy optional import: only when a teacher is loaded
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def load_kwargs(teacher: str | os.PathLike, variant: str = "") -> dict:
    """from_pretrained kwargs: never contact the hub when offline or for a local folder."""
    kw = {"local_files_only": offline() or Path(teacher).is_dir()}
    if variant:
        kw["variant"] = variant
    return kw
