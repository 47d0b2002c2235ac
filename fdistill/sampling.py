"""Backward-compatible names: the samplers now live in ``fdistill.sampler``, the image helpers in
``fdistill.imageio``, the ``fdistill sample`` command in ``fdistill.commands.sample``."""

from __future__ import annotations

from .imageio import save_grid, to_uint8, write_image_npz  # noqa: F401
from .sampler import (SampleSource, edm_nfe, edm_sample, one_step_sample, per_image_latents,  # noqa: F401
                      per_image_random_labels)
