"""Shared test set-up: everything offline, the tiny teachers several files use, and the quick tier.

Helpers that tests import by name live beside this file (``tiny_models.py``: tiny EDM and Stable Diffusion
teachers built from configs; ``edm_reference.py``: EDM-format pickles and a functional ADM reference); pytest
puts this folder on the import path (rootdir-relative, no ``sys.path`` edits). No test imports another test file.

Tiers: ``make test`` runs the whole suite (minus ``slow``); ``make test-quick`` (``pytest -m quick``) runs the
files listed in ``QUICK`` - the maths, the configs and the package's layers, in well under a minute - for the
edit loop.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any test module imports diffusers / transformers

import pytest  # noqa: E402
from tiny_models import make_tiny_sd  # noqa: E402

QUICK = {
    "test_divergences.py", "test_ratio.py", "test_objective_gradient.py", "test_denoisers.py", "test_layers.py",
    "test_lm_losses.py", "test_lm_config.py", "test_metrics_pr.py", "test_prompts.py", "test_docs.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in QUICK:
            item.add_marker(pytest.mark.quick)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    """A tiny Stable Diffusion pipeline folder (epsilon prediction), built once per session."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
