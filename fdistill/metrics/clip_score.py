"""CLIP score: mean cosine similarity of image and caption embeddings (the 0.29-0.31 figures of the papers).

The protocol follows DMD2's COCO evaluation (inherited from GigaGAN), which the f-distill paper compares with:
open_clip ViT-g-14 (``laion2b_s12b_b42k`` weights), each image centre-cropped to a square and resized to 256
with PIL Lanczos before CLIP's own preprocessing, each caption prefixed with "A photo depicts " (Hessel et al.
2021), truncated to the context length. The score is the plain cosine (not x100, not clipped at 0).

Weights are never fetched implicitly: pass a checkpoint file (``pretrained=/path/open_clip_pytorch_model.bin``),
a ``local-dir:/path`` model name (a folder with ``open_clip_config.json`` and weights), or a pretrained tag
that open_clip resolves from the Hugging Face cache (set HF_HUB_OFFLINE=1 where there is no network).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import center_crop
from tqdm import tqdm

DEFAULT_MODEL = "ViT-g-14"
PAPER_PRETRAINED = "laion2b_s12b_b42k"
DEFAULT_PREFIX = "A photo depicts "
DEFAULT_PRE_RESIZE = 256

_CACHE: dict = {}


def load_clip(model_name: str = DEFAULT_MODEL, pretrained: str | None = None, device="cpu"):
    """(model, preprocess, tokenizer) from open_clip, with real weights or an error (never random weights).

    ``model_name`` is an open_clip architecture (``ViT-g-14``) with ``pretrained`` a checkpoint path or tag, or
    ``local-dir:/path`` holding ``open_clip_config.json`` and a checkpoint (``pretrained`` is then ignored).
    """
    import open_clip

    key = (model_name, pretrained, str(device))
    if key in _CACHE:
        return _CACHE[key]
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no open_clip_config.json (needed for a local-dir: model)")
        if not any(any(folder.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
            raise FileNotFoundError(f"{folder} holds no CLIP weights (*.safetensors, *.bin or *.pth)")
        pretrained = None
    elif pretrained is None:
        raise ValueError(
            f"No CLIP weights given for {model_name}. Pass pretrained=PATH (a checkpoint file, e.g. the "
            f"{PAPER_PRETRAINED} open_clip_pytorch_model.bin), model_name='local-dir:/folder', or "
            f"pretrained='{PAPER_PRETRAINED}' to use open_clip's Hugging Face cache.")
    elif (os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))) \
            and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"CLIP checkpoint not found: {pretrained}")
    # require_pretrained: open_clip otherwise returns a randomly initialised model when no weights are found.
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, require_pretrained=True)
    except RuntimeError as e:
        # open_clip reports a tag it cannot fetch (offline, not cached) as RuntimeError.
        raise ValueError(f"could not load CLIP {model_name} with pretrained={pretrained!r}: {e}. Offline, pass a "
                         "local checkpoint file or a local-dir: folder.") from e
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    _CACHE[key] = (model, preprocess, tokenizer)
    return _CACHE[key]


def _to_pil_list(images) -> list[Image.Image]:
    """PIL RGB images from: uint8 numpy NHWC/NHW, torch float NCHW in [-1, 1] (or uint8), a list of PIL images,
    arrays or file paths."""
    if isinstance(images, torch.Tensor):
        x = images.detach()
        if x.dtype != torch.uint8:
            x = (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        images = x.permute(0, 2, 3, 1).cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8, got {images.dtype}")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        return [Image.fromarray(im).convert("RGB") for im in images]
    out = []
    for im in images:
        if isinstance(im, (str, os.PathLike)):
            with Image.open(im) as f:
                im = f.convert("RGB")
        elif isinstance(im, np.ndarray):
            im = Image.fromarray(im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im)
        out.append(im.convert("RGB"))
    return out


def _center_crop_resize(im: Image.Image, size: int) -> Image.Image:
    # torchvision's centre crop, as DMD2 uses (its rounding of odd margins differs from a floor division).
    return center_crop(im, min(im.size)).resize((size, size), Image.LANCZOS)


@torch.no_grad()
def clip_similarities(images, captions: Sequence[str], model_name: str = DEFAULT_MODEL,
                      pretrained: str | None = None, batch_size: int = 64, device="cpu", model=None,
                      preprocess=None, tokenizer=None, prefix: str = DEFAULT_PREFIX,
                      pre_resize: int | None = DEFAULT_PRE_RESIZE, progress: bool = False) -> np.ndarray:
    """Cosine similarity of each (image, caption) pair, float64 [N]. See ``clip_score``."""
    if model is None:
        model, preprocess, tokenizer = load_clip(model_name, pretrained, device)
    elif preprocess is None or tokenizer is None:
        raise ValueError("with model=..., also pass preprocess= and tokenizer=")
    model.eval()
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        images = list(images)
    captions = list(captions)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("no images given")
    dev = torch.device(device)
    sims = []
    starts = range(0, len(images), batch_size)
    if progress:
        starts = tqdm(starts, desc="CLIP score", unit="batch")
    for i in starts:
        # Decode one batch at a time: 30k images at 512x512 would not fit in memory at once.
        ims = _to_pil_list(images[i:i + batch_size])
        if pre_resize:
            ims = [_center_crop_resize(im, pre_resize) for im in ims]
        pixels = torch.stack([preprocess(im) for im in ims]).to(dev)
        tokens = tokenizer([prefix + c for c in captions[i:i + batch_size]]).to(dev)
        img_emb = model.encode_image(pixels).float()
        txt_emb = model.encode_text(tokens).float()
        sims.append(F.cosine_similarity(img_emb, txt_emb, dim=-1).double().cpu())
    return torch.cat(sims).numpy()


def clip_score(images, captions: Sequence[str], model_name: str = DEFAULT_MODEL, pretrained: str | None = None,
               batch_size: int = 64, device="cpu", model=None, preprocess=None, tokenizer=None,
               prefix: str = DEFAULT_PREFIX, pre_resize: int | None = DEFAULT_PRE_RESIZE,
               progress: bool = False) -> float:
    """Mean cosine similarity between CLIP embeddings of ``images[i]`` and ``captions[i]``.

    ``images``: uint8 numpy NHWC, torch float NCHW in [-1, 1], or a list of PIL images / arrays / paths.
    Either name the model (``model_name``, ``pretrained``; see ``load_clip``) or pass an already built
    ``model`` with its ``preprocess`` and ``tokenizer`` (tests, custom models). ``prefix`` and ``pre_resize``
    default to DMD2's protocol; ``prefix=""``, ``pre_resize=None`` give the bare CLIP cosine.
    """
    return float(clip_similarities(images, captions, model_name, pretrained, batch_size, device, model,
                                   preprocess, tokenizer, prefix, pre_resize, progress).mean())
