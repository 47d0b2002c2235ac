"""Evaluation metrics: FID (clean-fid pipeline, offline Inception), precision/recall, CLIP score.

Submodules are imported on first use so that ``import fdistill.metrics`` stays cheap (clean-fid and open_clip
pull in torchvision, scipy and more):

* ``fdistill.metrics.fid``: ``inception_features``, ``stats_from_features``, ``fid_from_stats``, ``save_stats``,
  ``load_stats``, ``compute_fid``, ``make_reference``.
* ``fdistill.metrics.inception``: ``load_inception``, ``find_inception``.
* ``fdistill.metrics.precision_recall``: ``precision_recall``.
* ``fdistill.metrics.clip_score``: ``clip_score``, ``load_clip``.
* ``fdistill.commands.eval``: ``main(argv)`` behind ``fdistill eval``.
"""

import importlib

_SUBMODULES = ("fid", "inception", "precision_recall", "clip_score", "cli")

__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
