"""ImageNet-64 (paper s.5): EDM's class-conditional ADM teacher ``edm-imagenet-64x64-cond-adm.pkl``, converted by
``fdistill convert-edm``, with ImageNet 64x64 in EDM's dataset-zip format as the real data.

It is the ``image`` pipeline with ImageNet-64's resolution, channels and classes as defaults (checked against
the teacher, so a wrong folder fails at once). Recipe: configs/imagenet64_*.yaml; guide: docs/imagenet64.md.
"""

from __future__ import annotations

from ..task import Task
from .image import DEFAULTS as IMAGE_DEFAULTS
from .image import build as build_image

RESOLUTION = 64
NUM_CLASSES = 1000

DEFAULTS = {**IMAGE_DEFAULTS, "resolution": RESOLUTION, "channels": 3, "num_classes": NUM_CLASSES}


def build(cfg, device) -> Task:
    return build_image(cfg, device, DEFAULTS, "imagenet64")
