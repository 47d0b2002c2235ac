"""fdistill: one-step diffusion distillation with f-divergence distribution matching (f-distill).

Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching", arXiv 2502.15681.
"""

__version__ = "0.1.0"

from .divergences import Divergence, available_divergences, get_divergence  # noqa: F401
