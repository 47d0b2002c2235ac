"""Checkpoint converters. EDM pickles are read without executing the code embedded in them."""

from .edm import convert_edm, edm_denoise, load_converted, read_edm_network
from .safe_pickle import UnsafePickleError, safe_load

__all__ = ["convert_edm", "edm_denoise", "load_converted", "read_edm_network", "safe_load", "UnsafePickleError"]
