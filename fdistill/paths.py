"""Where the repository keeps its shipped files (the package is used from a checkout: ``pip install -e .``)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
CONFIGS = REPO / "configs"
MNIST_TEACHER_DIR = ASSETS / "mnist_teacher"
"""The embedded default teacher (``fdistill demo``): trained by ``train/teacher.py``, weights in safetensors."""
