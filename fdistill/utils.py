"""Small shared helpers: the dtype table, image file extensions, and the few distributed / atomic-file steps that
tasks take while they build caches (every process builds the task; one per node writes files).

Imports only the standard library, numpy and torch, so that any layer may use it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Config / command-line dtype names -> torch dtypes."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})
"""File suffixes read as images, matched case-insensitively: clean-fid's image set (its folder FID reads the same
files), without its .npy."""


def is_image_file(name: str | os.PathLike) -> bool:
    return os.path.splitext(str(name))[1].lower() in IMAGE_EXTENSIONS


def dtype_from_name(name: str, allowed=tuple(DTYPES), what: str = "dtype") -> torch.dtype:
    """``name`` -> torch dtype, with a one-line error naming the choices."""
    if name not in allowed or name not in DTYPES:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {name!r}")
    return DTYPES[name]


def dist_group():
    """torch.distributed when a process group is up, else None."""
    return dist if dist.is_available() and dist.is_initialized() else None


def is_local_writer() -> bool:
    """The process that writes node-local files (caches): local rank 0."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def barrier() -> None:
    d = dist_group()
    if d is not None:
        d.barrier()


def atomic_npy(path: Path, shape, dtype, fill) -> None:
    """Write an .npy memmap under a unique temporary name, fill it chunk by chunk, then rename it into place:
    an interrupted run never leaves a partial cache, and concurrent writers on a shared disk each rename a whole
    file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{socket.gethostname()}.{os.getpid()}.tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
    try:
        fill(arr)
        arr.flush()
        del arr
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
