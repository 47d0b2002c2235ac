"""FID on clean-fid's pipeline, with the Inception network found offline (``fdistill.metrics.inception``).

The pieces that decide the number are clean-fid's own: its resizers (``clean``: PIL bicubic on each channel as
float; ``legacy_tensorflow``: no resize outside, the network's TF-style bilinear resize inside), its folder/zip
reader (``get_files_features``), ``get_batch_features`` and ``frechet_distance``. What this module adds is input
handling (arrays, tensors, npz files, EDM's reference statistics) and a record of the protocol.

Protocols (docs/evaluation.md):

* ImageNet-64 as in EDM / DMD2 / f-distill: 50,000 samples (seeds 0..49999) against EDM's reference statistics
  ``imagenet-64x64.npz``, mode ``legacy_tensorflow`` -- EDM's fid.py feeds the 64x64 uint8 images to NVIDIA's
  TorchScript Inception, which resizes inside, and that is what ``legacy_tensorflow`` reproduces.
* COCO-30k as in DMD2 (after GigaGAN): 30,000 images; both generated and reference images are centre-cropped to a
  square and resized to 256 with PIL Lanczos (``pre_resize=256``), then mode ``clean``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cleanfid
import numpy as np
import torch
import torchvision
from cleanfid.fid import frechet_distance, get_batch_features, get_files_features
from cleanfid.resize import build_resizer
from PIL import Image
from tqdm import tqdm

from ..data.images import npz_member
from ..utils import is_image_file
from .inception import load_inception, sha256_file

MODES = ("clean", "legacy_tensorflow")
PAPER_NUM_SAMPLES = 50_000
STATS_FORMAT = "fdistill-fid-stats-v1"
# EDM's reference files were made by EDM's fid.py (NVIDIA Inception, resize inside the network).
EDM_STATS_MODE = "legacy_tensorflow"

ImageBatch = Any  # np.ndarray uint8 NHWC / NHW, or torch tensor NCHW (float in [-1, 1] or uint8)


# --------------------------------------------------------------------------------------------------------------
# Image inputs


def to_uint8_nhwc(images: ImageBatch) -> np.ndarray:
    """One batch -> uint8 [N, H, W, 3].

    * numpy uint8 NHWC (C = 1 or 3) or NHW (grayscale);
    * torch float NCHW in [-1, 1]: quantised as EDM does, ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` -- the
      papers measure saved 8-bit images, so generated tensors are measured after the same rounding;
    * torch uint8 NCHW.
    Grayscale is repeated to RGB, as PIL's ``convert('RGB')`` does for clean-fid's folder reader.
    """
    if isinstance(images, torch.Tensor):
        x = images.detach()
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"expected a tensor [N, C, H, W], got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            if not x.is_floating_point():
                raise ValueError(f"tensor images must be float in [-1, 1] or uint8, got {x.dtype}")
            x = (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        arr = x.permute(0, 2, 3, 1).cpu().numpy()
    else:
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise ValueError(
                f"numpy images must be uint8 in [0, 255] (NHWC), got {arr.dtype}; convert float images first or "
                "pass a torch tensor in [-1, 1]")
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4:
            raise ValueError(f"expected images [N, H, W, C], got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels (NHWC), got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _iter_batches(images: ImageBatch | Iterable[ImageBatch], batch_size: int):
    """Yield uint8 NHWC batches of at most ``batch_size`` from an array/tensor or an iterable of them."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = [images]
    for chunk in images:
        # Slice before converting: a memory-mapped npz of 50k images is then read batch by batch.
        for i in range(0, len(chunk), batch_size):
            yield to_uint8_nhwc(chunk[i:i + batch_size])


def center_crop_resize(size: int) -> Callable[[np.ndarray], np.ndarray]:
    """DMD2/GigaGAN's COCO preprocessing: centre-crop the long edge to a square, resize to ``size`` (PIL Lanczos).

    Returned as a function of a uint8 HWC array, the shape clean-fid's ``custom_image_tranform`` expects.
    """
    def transform(img: np.ndarray) -> np.ndarray:
        pil = Image.fromarray(img)
        side = min(pil.size)
        pil = torchvision.transforms.functional.center_crop(pil, side)
        return np.array(pil.resize((size, size), Image.LANCZOS))
    return transform


# --------------------------------------------------------------------------------------------------------------
# Features


def _resolve_model(weights, device) -> Callable[[torch.Tensor], torch.Tensor]:
    if weights is None or isinstance(weights, (str, os.PathLike)):
        return load_inception(weights, device=device)
    if callable(weights):
        return weights
    raise TypeError(f"weights must be a path, None or a feature extractor, got {type(weights)}")


def inception_features(images, batch_size: int = 50, device: str | torch.device = "cpu", mode: str = "clean",
                       weights=None, progress: bool = True, pre_resize: int | None = None) -> np.ndarray:
    """Inception pool features [N, 2048] (float32) of images in memory, exactly as clean-fid computes them.

    ``images``: uint8 numpy NHWC/NHW, a float torch tensor NCHW in [-1, 1] (or uint8), or an iterable of such
    batches (e.g. a generator that samples batch by batch). ``mode``: ``clean`` (PIL bicubic on float channels to
    299) or ``legacy_tensorflow`` (TF-style bilinear inside the network). ``weights``: a path, None (default
    lookup), or an already loaded extractor. ``pre_resize``: optional COCO-style centre crop + Lanczos resize.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = _resolve_model(weights, device)
    fn_resize = build_resizer(mode)
    transform = center_crop_resize(pre_resize) if pre_resize else None
    # clean-fid's ResizeDataset turns the resized array into a tensor with ToTensor (x255 for uint8); copy that so
    # arrays and folders give identical features.
    to_tensor = torchvision.transforms.ToTensor()
    feats = []
    batches = _iter_batches(images, batch_size)
    if progress:
        total = -(-len(images) // batch_size) if isinstance(images, (np.ndarray, torch.Tensor)) else None
        batches = tqdm(batches, desc=f"Inception features ({mode})", unit="batch", total=total)
    for arr in batches:
        tensors = []
        for img in arr:
            if transform is not None:
                img = transform(img)
            img = fn_resize(img)
            t = to_tensor(img) * 255 if img.dtype == np.uint8 else to_tensor(img)
            tensors.append(t)
        feats.append(get_batch_features(torch.stack(tensors), model, device))
    if not feats:
        raise ValueError("no images given")
    return np.concatenate(feats).astype(np.float32, copy=False)


def list_image_files(path: str | os.PathLike) -> list[str]:
    """Image files of a folder (recursive) or zip (e.g. an EDM dataset zip), sorted (``fdistill.utils``'s image
    extensions, any case)."""
    path = str(path)
    if path.lower().endswith(".zip") and os.path.isfile(path):
        with zipfile.ZipFile(path) as zf:
            return sorted(n for n in zf.namelist() if is_image_file(n))
    return sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                  if is_image_file(f) and os.path.isfile(f))


def folder_features(path: str | os.PathLike, num: int | None = None, batch_size: int = 50,
                    device: str | torch.device = "cpu", mode: str = "clean", weights=None, num_workers: int = 0,
                    progress: bool = True, pre_resize: int | None = None) -> np.ndarray:
    """Features of the first ``num`` (sorted) images of a folder or zip, through clean-fid's own file reader."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    files = list_image_files(path)
    if not files:
        raise ValueError(f"no images found in {path}")
    if num is not None:
        _check_count(len(files), num, path)
        files = files[:num]
    model = _resolve_model(weights, device)
    # clean-fid's reader recognises a zip by '.zip' in fdir and then reads the names inside it.
    is_zip = str(path).lower().endswith(".zip") and os.path.isfile(path)
    try:
        feats = get_files_features(
            files, model, num_workers=num_workers, batch_size=batch_size, device=torch.device(device), mode=mode,
            fdir=str(path) if is_zip else None, verbose=progress, description=f"Inception features {path}: ",
            custom_image_tranform=center_crop_resize(pre_resize) if pre_resize else None,
        )
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" not in str(e):
            raise
        raise ValueError(f"{path} holds images of different sizes, which mode {mode} passes to Inception as they "
                         "are: resize them to one size first, or pass --pre-resize S") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL's errors for a file that is no image
        raise ValueError(f"{path}: an image file cannot be read ({type(e).__name__}: {e}); remove or replace it") \
            from None
    return feats.astype(np.float32, copy=False)


def _check_count(available: int, num: int, source) -> None:
    if available < num:
        raise ValueError(
            f"{source} holds {available} images but {num} were asked for. The papers' protocol is "
            f"{PAPER_NUM_SAMPLES:,} samples; pass --num {available} (or num={available}) to measure fewer -- the "
            "result records it, and it is not comparable with published numbers.")


# --------------------------------------------------------------------------------------------------------------
# Statistics


def stats_from_features(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as clean-fid and EDM compute them: mean and unbiased covariance, float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def check_stats(mu, sigma, what: str = "statistics") -> None:
    """Refuse statistics that no FID can come from: not a mean and its covariance, or non-finite values (the
    images or features they were made from held NaN, e.g. a diverged generator's)."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{what}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{what} hold non-finite values (NaN or inf): the images they come from are not valid "
                         "(a diverged generator?); recompute them from finite images")


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between two Gaussians (clean-fid's ``frechet_distance``); statistics that are not finite
    or of different dimensions are refused."""
    check_stats(mu1, sigma1, "the first statistics")
    check_stats(mu2, sigma2, "the second statistics")
    if np.shape(mu1) != np.shape(mu2):
        raise ValueError(f"statistics of {np.shape(mu1)[0]} and {np.shape(mu2)[0]} features cannot be compared: "
                         "both must come from the same feature extractor (Inception: 2048)")
    return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    return fid_from_stats(*stats_from_features(feats1), *stats_from_features(feats2))


def save_stats(path: str | os.PathLike, mu, sigma, **meta) -> None:
    """Write ``mu``/``sigma`` (the keys EDM's reference files use) plus JSON metadata under ``meta``.

    The metadata (mode, number of images, Inception file hash, ...) lets ``fdistill eval fid`` refuse to compare
    statistics made under a different protocol. ``features=`` (an array) is stored as ``feats`` for
    precision/recall, not in the JSON.
    """
    feats = meta.pop("features", None)
    arrays = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64),
              "meta": np.array(json.dumps({"format": STATS_FORMAT, **meta}, default=str))}
    if feats is not None:
        arrays["feats"] = np.asarray(feats, dtype=np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name first so an interrupted run never leaves a truncated stats file behind.
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _unreadable_npz(path, e: Exception) -> ValueError:
    """The error for an npz numpy cannot read (truncated, not an npz, or holding object arrays)."""
    return ValueError(f"{path} is not a readable .npz file (truncated, corrupt or not an npz: "
                      f"{type(e).__name__}); write it again")


@contextlib.contextmanager
def _open_npz(path):
    """``np.load`` of an npz, never with pickles, its failures as one clear ValueError."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, ValueError (object arrays) ...
        raise _unreadable_npz(path, e) from None
    with data:
        try:
            yield data
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:  # a member cut short
            raise _unreadable_npz(path, e) from None
        except ValueError as e:
            if "pickle" in str(e) or "Object arrays" in str(e):
                raise _unreadable_npz(path, e) from None
            raise


def _npz_keys(path) -> list[str]:
    with _open_npz(path) as data:
        return list(data.keys())


def is_stats_file(path: str | os.PathLike) -> bool:
    """True for an .npz holding ``mu`` and ``sigma`` (ours, EDM's, clean-fid's, ADM's reference batches)."""
    if not str(path).endswith(".npz") or not os.path.isfile(path):
        return False
    keys = _npz_keys(path)
    return "mu" in keys and "sigma" in keys


def load_stats(path: str | os.PathLike, with_meta: bool = False):
    """(mu, sigma) from an .npz with keys ``mu``/``sigma`` -- ours or EDM's published reference files
    (``imagenet-64x64.npz``, ``cifar10-32x32.npz``). ``with_meta=True`` also returns the metadata dict
    (empty for files without it)."""
    with _open_npz(path) as data:
        keys = list(data.keys())
        if "mu" not in keys or "sigma" not in keys:
            hint = ""
            if any(k in keys for k in ("arr_0", "x", "images")):
                hint = (" It looks like an npz of images: pass it as the reference directly, or make statistics "
                        "with `fdistill eval ref DATA --out stats.npz`.")
            raise ValueError(f"{path} is not an FID statistics file: expected keys 'mu' and 'sigma', found "
                             f"{keys}.{hint}")
        mu = np.asarray(data["mu"], dtype=np.float64)
        sigma = np.asarray(data["sigma"], dtype=np.float64)
        meta = json.loads(str(data["meta"])) if "meta" in keys else {}
    check_stats(mu, sigma, f"the statistics in {path}")
    return (mu, sigma, meta) if with_meta else (mu, sigma)


# --------------------------------------------------------------------------------------------------------------
# Files of images and features


IMAGE_NPZ_KEYS = ("arr_0", "x", "images")


def _npz_array(path, key) -> np.ndarray:
    """Memory-mapped when the member is stored uncompressed (np.savez), so 50k images are not all loaded."""
    return npz_member(str(path), key)


def load_image_npz(path: str | os.PathLike) -> np.ndarray:
    """uint8 images NHWC from an npz (``arr_0`` as np.savez writes and ADM/EDM sample batches use, ``x``, or
    ``images``), memory-mapped where possible. NCHW input is transposed (a view, still lazy)."""
    keys = _npz_keys(path)
    key = next((k for k in IMAGE_NPZ_KEYS if k in keys), None)
    if key is None:
        what = "FID statistics need both 'mu' and 'sigma'" if {"mu", "sigma"} & set(keys) else \
            (f"neither FID statistics ('mu', 'sigma'), nor features (one of {FEATURE_NPZ_KEYS}), nor images "
             f"(one of {IMAGE_NPZ_KEYS})")
        raise ValueError(f"{path} holds {what}; its keys are {keys}")
    arr = _npz_array(path, key)
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}[{key!r}] must be uint8 images, got {arr.dtype}")
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    return arr


FEATURE_NPZ_KEYS = ("feats", "features")


def load_features_npz(path: str | os.PathLike) -> np.ndarray | None:
    """Stored Inception features of an npz, or None: ``feats`` (``eval fid --save-features``, ``eval ref
    --keep-features``) or ``features`` (the demo's shipped reference, ``assets/mnist_teacher/ref_features.npz``)."""
    with _open_npz(path) as data:
        key = next((k for k in FEATURE_NPZ_KEYS if k in data), None)
        return np.asarray(data[key], dtype=np.float32) if key else None


def features_of(source, num: int | None = None, **kw) -> np.ndarray:
    """Features of a folder, zip, image npz, feature npz (``feats`` or ``features``) or in-memory images; the
    first ``num``."""
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        if os.path.isdir(s) or (s.lower().endswith(".zip") and os.path.isfile(s)):
            return folder_features(s, num=num, **kw)
        if s.endswith(".npz"):
            feats = load_features_npz(s)
            if feats is not None:
                _check_feature_meta(s, kw.get("mode"), kw.get("pre_resize"))
                if num is not None:
                    _check_count(len(feats), num, s)
                    feats = feats[:num]
                return feats
            images = load_image_npz(s)
            if num is not None:
                _check_count(len(images), num, s)
                images = images[:num]
            kw.pop("num_workers", None)
            return inception_features(images, **kw)
        raise ValueError(f"{s}: expected a folder of images, a zip, or an .npz")
    kw.pop("num_workers", None)
    if num is not None and isinstance(source, (np.ndarray, torch.Tensor)):
        _check_count(len(source), num, "the given images")
        source = source[:num]
    feats = inception_features(source, **kw)
    if num is not None:
        _check_count(len(feats), num, "the given images")
        feats = feats[:num]
    return feats


def _check_feature_meta(path, mode, pre_resize) -> None:
    """Stored features are only usable under the protocol they were computed with."""
    meta = load_stats(path, with_meta=True)[2] if is_stats_file(path) else {}
    if meta.get("mode") and mode and meta["mode"] != mode:
        raise ValueError(f"{path}: features were computed with mode {meta['mode']!r}, not {mode!r}")
    if meta and meta.get("pre_resize") != pre_resize:
        raise ValueError(f"{path}: features were computed with pre_resize={meta.get('pre_resize')}, not "
                         f"{pre_resize}")


def describe_file(path) -> dict:
    """Path, size and sha256 of a file (for the protocol record); folders get their image count."""
    p = Path(path)
    if p.is_file():
        return {"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
    if p.is_dir():
        return {"path": str(p.resolve()), "num_images": len(list_image_files(p))}
    return {"path": str(path)}


# --------------------------------------------------------------------------------------------------------------
# The whole measurement


def reference_stats(ref, mode: str | None, ref_num: int | None = None, **kw):
    """(mu, sigma, info, mode) for a reference: stats npz, folder, zip or image npz.

    ``mode=None`` takes the mode the statistics were made with (EDM's files: ``legacy_tensorflow``), else
    ``clean``. A mode that contradicts the statistics' recorded mode is an error: the number would mean nothing.
    """
    if isinstance(ref, (str, os.PathLike)) and is_stats_file(ref):
        mu, sigma, meta = load_stats(ref, with_meta=True)
        recorded = meta.get("mode")
        info = {"kind": "stats", **describe_file(ref), "meta": meta}
        if recorded is None:
            # EDM's/ADM's/clean-fid's files carry no metadata. EDM's were made with the TF-style resize.
            info["assumed_mode"] = EDM_STATS_MODE
            if mode is None:
                mode = EDM_STATS_MODE
            elif mode != EDM_STATS_MODE:
                warnings.warn(
                    f"{ref} carries no metadata; EDM's reference files were computed with the TF-style resize "
                    f"(mode legacy_tensorflow) but mode={mode!r} was asked for. Make sure the statistics match.")
        else:
            if mode is None:
                mode = recorded
            elif mode != recorded:
                raise ValueError(f"{ref} was computed with mode {recorded!r}, but mode {mode!r} was asked for.")
            pre = meta.get("pre_resize")
            if pre != kw.get("pre_resize"):
                raise ValueError(f"{ref} was computed with pre_resize={pre}, but pre_resize="
                                 f"{kw.get('pre_resize')} was asked for.")
        return mu, sigma, info, mode
    mode = mode or "clean"
    feats = features_of(ref, num=ref_num, mode=mode, **kw)
    mu, sigma = stats_from_features(feats)
    info = {"kind": "images", **(describe_file(ref) if isinstance(ref, (str, os.PathLike)) else {}),
            "num_images": len(feats)}
    return mu, sigma, info, mode


def compute_fid(gen, ref, mode: str | None = None, num: int | None = PAPER_NUM_SAMPLES, ref_num: int | None = None,
                weights=None, batch_size: int = 50, device: str | torch.device = "cpu", num_workers: int = 0,
                pre_resize: int | None = None, progress: bool = True, save_features: str | None = None) -> dict:
    """FID of generated images against a reference, with the protocol recorded.

    ``gen``: folder, zip, image npz (``arr_0``/``x`` uint8 NHWC), feature npz, or images in memory; the first
    ``num`` are used (default 50,000, the papers'; None = all). ``ref``: stats npz (``mu``/``sigma``; EDM's
    reference files work), folder, zip or image npz (all images unless ``ref_num``). ``mode``: None picks the
    mode the reference statistics were made with (EDM's: ``legacy_tensorflow``), else ``clean``.
    Returns a JSON-able dict with ``fid`` and the protocol.
    """
    # Inception is loaded (once, cached) only when images have to be encoded: features and statistics files
    # alone need no weights.
    kw = dict(batch_size=batch_size, device=device, weights=weights, num_workers=num_workers, progress=progress,
              pre_resize=pre_resize)
    mu_r, sigma_r, ref_info, mode = reference_stats(ref, mode, ref_num=ref_num, **kw)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    feats = features_of(gen, num=num, mode=mode, **kw)
    gen_is_features = (isinstance(gen, (str, os.PathLike)) and str(gen).endswith(".npz")
                       and load_features_npz(gen) is not None)
    if gen_is_features:
        model = _RecordedInception(load_stats(gen, with_meta=True)[2] if is_stats_file(gen) else {})
    else:
        model = _resolve_model(weights, device)  # already loaded by features_of: cached
    if save_features:
        save_stats(save_features, *stats_from_features(feats), features=feats,
                   **_protocol(model, mode, len(feats), pre_resize, gen))
    mu_g, sigma_g = stats_from_features(feats)
    fid = fid_from_stats(mu_g, sigma_g, mu_r, sigma_r)
    gen_info = describe_file(gen) if isinstance(gen, (str, os.PathLike)) else {"path": None}
    seeds = _npz_seeds(gen, len(feats))
    if seeds is not None:
        gen_info["seeds"] = seeds
    return {
        "metric": "fid",
        "fid": fid,
        "protocol": _protocol(model, mode, len(feats), pre_resize, None),
        "gen": gen_info,
        "ref": ref_info,
    }


class _RecordedInception:
    """The Inception record of features read from a file (path and sha256 as stored with them)."""

    def __init__(self, meta: dict):
        inc = meta.get("inception") or {}
        self.path = inc.get("path", "unknown (features file)")
        self.sha256 = inc.get("sha256")


def _npz_seeds(source, num: int) -> dict | None:
    """Summary of the ``seeds`` an npz of samples records (the papers use seeds 0..N-1), or None."""
    if not (isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz")):
        return None
    with _open_npz(source) as data:
        if "seeds" not in data:
            return None
        seeds = np.asarray(data["seeds"]).reshape(-1)[:num]
    return {"count": int(len(seeds)), "first": int(seeds[0]), "last": int(seeds[-1]),
            "are_0_to_n_minus_1": bool(np.array_equal(seeds, np.arange(len(seeds))))}


def _protocol(model, mode, num, pre_resize, source) -> dict:
    inc = {"path": str(getattr(model, "path", "custom")), "sha256": getattr(model, "sha256", None)}
    out = {
        "num_samples": int(num),
        "paper_num_samples": PAPER_NUM_SAMPLES,
        "mode": mode,
        "resize": ("PIL bicubic per float channel to 299 (clean-fid clean)" if mode == "clean"
                   else "TF-style bilinear inside the network (clean-fid legacy_tensorflow / EDM fid.py)"),
        "pre_resize": pre_resize,
        "inception": inc,
        "clean_fid_version": getattr(cleanfid, "__version__", None),
        "torch_version": torch.__version__,
    }
    if source is not None:
        out["source"] = str(source) if isinstance(source, (str, os.PathLike)) else None
    return out


def make_reference(data, out: str | os.PathLike, mode: str = "clean", num: int | None = None, weights=None,
                   batch_size: int = 50, device: str | torch.device = "cpu", num_workers: int = 0,
                   pre_resize: int | None = None, progress: bool = True, keep_features: bool = False) -> dict:
    """Write reference statistics of ``data`` (folder, zip, image npz) to ``out``; return their metadata."""
    model = _resolve_model(weights, device)
    feats = features_of(data, num=num, mode=mode, batch_size=batch_size, device=device, weights=model,
                        num_workers=num_workers, progress=progress, pre_resize=pre_resize)
    mu, sigma = stats_from_features(feats)
    meta = _protocol(model, mode, len(feats), pre_resize, data)
    save_stats(out, mu, sigma, **meta, **({"features": feats} if keep_features else {}))
    return {"metric": "fid-reference", "out": str(out), **meta}
