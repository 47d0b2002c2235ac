"""Convert NVlabs EDM checkpoints (ADM / `DhariwalUNet`) to a diffusers `UNet2DModel` folder.

`fdistill convert-edm PKL_OR_STATE_DICT OUT_DIR` reads an EDM network pickle such as
`edm-imagenet-64x64-cond-adm.pkl` without executing the class source embedded in it (see `safe_pickle`),
or a plain state dict (`.pth` / `.pt` / `.safetensors`) with EDM's parameter names, and writes

    OUT_DIR/config.json, OUT_DIR/diffusion_pytorch_model.safetensors   (UNet2DModel.save_pretrained)
    OUT_DIR/fdistill_config.json                                        (EDM preconditioning + provenance)

The EDM preconditioning stays outside the UNet:

    D(x, sigma, y) = c_skip x + c_out F(c_in x, c_noise, y),   c_noise = log(sigma) / 4,
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2)

and the UNet's `timestep` argument receives c_noise as is (flip_sin_to_cos=True, freq_shift=0 reproduce EDM's
PositionalEmbedding). `load_converted` loads the folder back; `edm_denoise` applies the preconditioning.

Only ADM maps exactly onto `UNet2DModel`. EDM's DDPM++/NCSN++ (`SongUNet`) differ in ways the diffusers
config cannot express (the label embedding enters before the noise MLP, the first conv is narrower than the
first level, up/down blocks carry 1x1 skip projections, decoder attention sits on the last block only,
NCSN++'s Fourier embedding and residual encoder), so they are refused with an explanation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..checkpoint import CheckpointError
from ..denoisers import EDMPrecondUNet
from .safe_pickle import UnsafePickleError, module_state, safe_load

__all__ = [
    "PRECOND_FILE", "EDMNetwork", "read_edm_network", "adm_unet_config", "map_adm_state_dict", "build_unet",
    "convert_edm", "load_converted", "edm_denoise", "UnsafePickleError",
]

PRECOND_FILE = "fdistill_config.json"
# EDM's sampling range (its generate.py defaults); EDMPrecond itself accepts (0, inf).
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0
EDM_RHO = 7.0
# DhariwalUNet hard-codes channels_per_head=64 for its attention blocks.
ADM_CHANNELS_PER_HEAD = 64

# What the conversion writes for EDM's edm-imagenet-64x64-cond-adm.pkl (296M parameters): a diffusers UNet2DModel
# config. Tests and benchmarks build the full-size network from it with random weights.
ADM_IMAGENET64 = dict(
    sample_size=64, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    mid_block_type="UNetMidBlock2D",
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    block_out_channels=[192, 384, 576, 768], layers_per_block=3, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="resnet", upsample_type="resnet", dropout=0.1, act_fn="silu", attention_head_dim=64,
    norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5, resnet_time_scale_shift="scale_shift",
    add_attention=True, class_embed_type=None, num_class_embeds=1000,
)

_BLOCK_PARTS = {  # EDM UNetBlock sub-layer -> diffusers ResnetBlock2D sub-layer
    "norm0": "norm1", "conv0": "conv1", "affine": "time_emb_proj", "norm1": "norm2", "conv1": "conv2",
    "skip": "conv_shortcut",
}
_KEY_RE = re.compile(r"^(enc|dec)\.(\d+)x(\d+)_([A-Za-z0-9_]+?)\.(.+)$")
# Weights that exist in some EDM networks but never take part in sampling.
_UNUSED_AT_SAMPLING = ("map_augment.weight",)  # augmentation labels: passed only during training


@dataclass
class EDMNetwork:
    """What a checkpoint holds, as data: UNet tensors (EDM names, no `model.` prefix) and recorded attributes."""

    state_dict: dict[str, torch.Tensor]
    source: str
    source_format: str  # "edm-pickle" | "torch-zip" | "state-dict"
    precond_class: str | None = None
    model_class: str | None = None
    precond_attrs: dict[str, Any] = field(default_factory=dict)
    model_init_kwargs: dict[str, Any] = field(default_factory=dict)
    module_attrs: dict[str, tuple[str, dict]] = field(default_factory=dict)  # UNet-relative path -> (class, attrs)


# ----------------------------------------------------------------------------------------------------------
# Reading


def _plain(v):
    """JSON-able copy of a recorded attribute (numpy scalars -> Python numbers); None if not plain."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        items = [_plain(x) for x in v]
        return None if any(x is None and y is not None for x, y in zip(items, v)) else items
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return None


def _walk(obj, prefix: str, tensors: dict, modules: dict, source: str):
    rec = module_state(obj)
    if rec is None:
        raise ValueError(f"{source}: expected a network module at '{prefix or '<root>'}', found "
                         f"{type(obj).__name__}")
    cls, state = rec
    attrs = {k: _plain(v) for k, v in state.items() if not k.startswith("_")}
    attrs["_init_kwargs"] = _plain(state.get("_init_kwargs") or {})
    modules[prefix.rstrip(".")] = (cls, attrs)
    for k, v in (state.get("_parameters") or {}).items():
        if v is not None:
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{source}: parameter {prefix}{k} is not a tensor")
            tensors[prefix + k] = v
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for k, v in (state.get("_buffers") or {}).items():
        if v is not None and k not in skip:
            tensors[prefix + k] = v
    for k, sub in (state.get("_modules") or {}).items():
        if sub is not None:
            _walk(sub, f"{prefix}{k}.", tensors, modules, source)


def _strip_prefix(sd: dict, prefix: str) -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _find_network(obj, source: str):
    if module_state(obj) is not None:
        return obj
    if isinstance(obj, dict):
        # EDM network pickles: {'ema': EDMPrecond, 'loss_fn', 'augment_pipe', 'dataset_kwargs'};
        # EDM training states: {'net': ..., 'optimizer_state': ...}.
        for key in ("ema", "net", "model", "state_dict"):
            if key in obj and (module_state(obj[key]) is not None or _is_state_dict(obj[key])):
                return obj[key]
        if _is_state_dict(obj):
            return obj
    raise ValueError(f"{source}: found no EDM network in it (expected an EDM network pickle with an 'ema' entry, "
                     "or a state dict with EDM parameter names)")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and \
        any(isinstance(v, torch.Tensor) for v in obj.values())


def read_edm_network(path: str | os.PathLike) -> EDMNetwork:
    """Read an EDM pickle / torch checkpoint / safetensors file into an `EDMNetwork` without running its code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (give the EDM .pkl, or a .pth/.pt/.safetensors state dict)")
    source = str(path)
    if path.suffix == ".safetensors":
        obj, fmt = load_file(str(path)), "state-dict"
    else:
        obj = safe_load(path)
        fmt = "torch-zip" if _zip(path) else "edm-pickle"
    net = _find_network(obj, source)
    if module_state(net) is None:  # plain state dict
        sd = {k: v for k, v in net.items() if isinstance(v, torch.Tensor)}
        sd = _strip_prefix(_strip_prefix(sd, "module."), "model.")
        return EDMNetwork(state_dict=sd, source=source, source_format="state-dict")

    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, tuple[str, dict]] = {}
    _walk(net, "", tensors, modules, source)
    root_cls, root_attrs = modules[""]
    if "model" in modules and root_cls.endswith("Precond"):
        model_cls, model_attrs = modules["model"]
        sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        extra = sorted(k for k in tensors if not k.startswith("model."))
        if extra:
            raise ValueError(f"{source}: {root_cls} holds tensors outside its UNet, which the converter does not "
                             f"know how to keep: {extra[:5]}")
        attrs = {p[len("model."):]: m for p, m in modules.items() if p.startswith("model.")}
        precond_cls, precond_attrs = root_cls, root_attrs
    else:  # a bare UNet object
        model_cls, model_attrs, sd = root_cls, root_attrs, tensors
        attrs = {p: m for p, m in modules.items() if p}
        precond_cls, precond_attrs = None, {}
    return EDMNetwork(state_dict=sd, source=source, source_format=fmt, precond_class=precond_cls,
                      model_class=model_cls, precond_attrs=precond_attrs,
                      model_init_kwargs=dict(model_attrs.get("_init_kwargs") or {}), module_attrs=attrs)


def _zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


# ----------------------------------------------------------------------------------------------------------
# Architecture


def _check_supported(net: EDMNetwork):
    sd = net.state_dict
    song = net.model_class == "SongUNet" or any(re.match(r"dec\.\d+x\d+_aux_(conv|norm)\.", k) for k in sd)
    if song:
        raise ValueError(
            f"{net.source}: this is an EDM DDPM++/NCSN++ network (SongUNet). It does not map exactly onto diffusers "
            "UNet2DModel (its label embedding enters before the noise MLP, its first conv is narrower than the first "
            "level, its up/down blocks have 1x1 skip projections and its decoder attends only in the last block), so "
            "it is not converted. Only ADM networks (DhariwalUNet, e.g. edm-imagenet-64x64-cond-adm.pkl) are.")
    if net.model_class not in (None, "DhariwalUNet"):
        raise ValueError(f"{net.source}: unsupported EDM network class {net.model_class!r}; only DhariwalUNet (ADM)")
    if net.precond_class not in (None, "EDMPrecond"):
        raise ValueError(
            f"{net.source}: the network uses {net.precond_class}; only EDMPrecond is supported (the converted "
            "teacher is run with EDM preconditioning, which would give wrong outputs for "
            f"{net.precond_class}'s parameterisation)")
    missing = [k for k in ("map_layer0.weight", "map_layer1.weight", "out_conv.weight", "out_norm.weight")
               if k not in sd]
    if missing:
        raise ValueError(f"{net.source}: not an EDM ADM (DhariwalUNet) network, missing {missing}; keys look like "
                         f"{sorted(sd)[:6]}")


def _levels(sd: dict) -> dict[str, dict[int, dict[str, set]]]:
    """{'enc'|'dec': {resolution: {block name: set of sub-keys}}}"""
    out: dict[str, dict[int, dict[str, set]]] = {"enc": {}, "dec": {}}
    for k in sd:
        m = _KEY_RE.match(k)
        if m:
            side, h, w, name, rest = m.groups()
            if h != w:
                raise ValueError(f"non-square level in key {k}")
            out[side].setdefault(int(h), {}).setdefault(name, set()).add(rest)
    return out


def _attrs_values(net: EDMNetwork, cls: str, attr: str) -> set:
    return {a.get(attr) for c, a in net.module_attrs.values() if c == cls and a.get(attr) is not None}


def adm_unet_config(net: EDMNetwork) -> dict:
    """diffusers UNet2DModel config for an ADM network, inferred from its tensors (and recorded attributes)."""
    _check_supported(net)
    sd = net.state_dict
    lv = _levels(sd)
    res = sorted(lv["enc"], reverse=True)
    if not res:
        raise ValueError(f"{net.source}: no encoder blocks (enc.<R>x<R>_*) found")
    top, n = res[0], len(res)
    if res != [top >> i for i in range(n)] or sorted(lv["dec"], reverse=True) != res:
        raise ValueError(f"{net.source}: encoder/decoder resolutions {res} / {sorted(lv['dec'], reverse=True)} "
                         "are not a halving sequence shared by both")

    def blocks(side, r):
        idx = sorted(int(b[5:]) for b in lv[side][r] if re.fullmatch(r"block\d+", b))
        if idx != list(range(len(idx))):
            raise ValueError(f"{net.source}: {side} blocks at {r}x{r} are not numbered 0..n-1: {idx}")
        return len(idx)

    num_blocks = blocks("enc", top)
    for r in res:
        if blocks("enc", r) != num_blocks or blocks("dec", r) != num_blocks + 1:
            raise ValueError(f"{net.source}: diffusers needs the same number of blocks at every level; "
                             f"{r}x{r} has {blocks('enc', r)} encoder / {blocks('dec', r)} decoder blocks")
    chans = [int(sd[f"enc.{r}x{r}_block0.conv1.weight"].shape[0]) for r in res]
    attn = []
    for r in res:
        flags = {"qkv" in {p.split(".")[0] for p in lv[side][r][b]}
                 for side in ("enc", "dec") for b in lv[side][r] if b.startswith("block")}
        if len(flags) != 1:
            raise ValueError(f"{net.source}: attention at {r}x{r} is on some blocks only; diffusers attends after "
                             "every block of a level")
        attn.append(flags.pop())
    mid_attn = f"dec.{res[-1]}x{res[-1]}_in0.qkv.weight" in sd
    if f"dec.{res[-1]}x{res[-1]}_in1.qkv.weight" in sd:
        raise ValueError(f"{net.source}: attention on the second middle block has no diffusers counterpart")

    conv_in = sd[f"enc.{top}x{top}_conv.weight"]
    in_channels, out_channels = int(conv_in.shape[1]), int(sd["out_conv.weight"].shape[0])
    emb_ch, noise_ch = (int(s) for s in sd["map_layer0.weight"].shape)
    if noise_ch != chans[0] or int(conv_in.shape[0]) != chans[0]:
        raise ValueError(f"{net.source}: diffusers ties the noise-embedding width and the first conv to the first "
                         f"level's {chans[0]} channels; this network has {noise_ch} and {int(conv_in.shape[0])}")
    label_dim = int(sd["map_label.weight"].shape[1]) if "map_label.weight" in sd else 0
    if "map_label.bias" in sd:
        raise ValueError(f"{net.source}: map_label has a bias; ADM's label embedding has none")

    # adaptive_scale (scale/shift from the embedding) is what diffusers' "scale_shift" implements.
    for k, v in sd.items():
        if k.endswith(".affine.weight"):
            out_c = int(sd[k.replace(".affine.weight", ".conv0.weight")].shape[0])
            if int(v.shape[0]) != 2 * out_c:
                raise ValueError(f"{net.source}: {k} is not a scale/shift projection (adaptive_scale=False)")
    for s in _attrs_values(net, "UNetBlock", "skip_scale"):
        if not math.isclose(float(s), 1.0):
            raise ValueError(f"{net.source}: UNetBlock skip_scale={s}; the ADM mapping needs 1")

    # GroupNorm: EDM uses min(32, C // 4) groups per layer; diffusers has one group count for the whole model.
    norm_ch = [int(v.shape[0]) for k, v in sd.items() if re.search(r"(^|\.)(norm\d|out_norm)\.weight$", k)]
    groups = _attrs_values(net, "GroupNorm", "num_groups") or {min(32, c // 4) for c in norm_ch}
    if len(groups) != 1:
        raise ValueError(
            f"{net.source}: its GroupNorm layers use different group counts {sorted(groups)} (EDM takes "
            "min(32, channels // 4) per layer); diffusers UNet2DModel has a single norm_num_groups, so this network "
            "only converts when every normalised layer has >= 128 channels (e.g. model_channels >= 128)")
    g = groups.pop()
    eps = _attrs_values(net, "GroupNorm", "eps") or {1e-5}
    if len(eps) != 1:
        raise ValueError(f"{net.source}: GroupNorm eps differs between layers: {sorted(eps)}")
    eps = float(eps.pop())

    head_dims = set()
    for path, (cls, a) in net.module_attrs.items():
        if cls == "UNetBlock" and a.get("num_heads"):
            head_dims.add(int(a["out_channels"]) // int(a["num_heads"]))
    if len(head_dims) > 1:
        raise ValueError(f"{net.source}: attention head sizes {sorted(head_dims)} differ between blocks; "
                         "diffusers needs one")
    head_dim = head_dims.pop() if head_dims else ADM_CHANNELS_PER_HEAD
    for k, v in sd.items():
        if k.endswith(".qkv.weight") and int(v.shape[1]) % head_dim:
            raise ValueError(f"{net.source}: {k} has {int(v.shape[1])} channels, not a multiple of {head_dim}")

    _check_init_kwargs(net, dict(img_resolution=top, model_channels=noise_ch, num_blocks=num_blocks,
                                 label_dim=label_dim, in_channels=in_channels), chans, res, attn)

    dropout = _attrs_values(net, "UNetBlock", "dropout")
    dropout = float(dropout.pop()) if len(dropout) == 1 else float(net.model_init_kwargs.get("dropout", 0.0))
    down = ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn]
    up = ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)]
    return dict(
        sample_size=top, in_channels=in_channels, out_channels=out_channels, center_input_sample=False,
        time_embedding_type="positional", time_embedding_dim=None if emb_ch == 4 * chans[0] else emb_ch,
        freq_shift=0, flip_sin_to_cos=True, down_block_types=down, mid_block_type="UNetMidBlock2D",
        up_block_types=up, block_out_channels=chans, layers_per_block=num_blocks, mid_block_scale_factor=1,
        downsample_padding=1, downsample_type="resnet", upsample_type="resnet", dropout=dropout, act_fn="silu",
        attention_head_dim=head_dim, norm_num_groups=g, attn_norm_num_groups=g, norm_eps=eps,
        resnet_time_scale_shift="scale_shift", add_attention=mid_attn, class_embed_type=None,
        num_class_embeds=label_dim or None,
    )


def _check_init_kwargs(net: EDMNetwork, inferred: dict, chans: list, res: list, attn: list):
    """The pickle's recorded constructor arguments must describe the same network as its tensors."""
    kw = net.model_init_kwargs
    if not kw:
        return
    wrong = [(k, kw[k], v) for k, v in inferred.items() if k in kw and kw[k] != v]
    if "channel_mult" in kw and "model_channels" in kw and \
            [kw["model_channels"] * m for m in kw["channel_mult"]] != chans:
        wrong.append(("channel_mult", kw["channel_mult"], [c // chans[0] for c in chans]))
    if "attn_resolutions" in kw:
        # EDM builds no attention where channels // 64 == 0 heads
        want = [r in kw["attn_resolutions"] and c // ADM_CHANNELS_PER_HEAD > 0 for r, c in zip(res, chans)]
        if want != attn:
            wrong.append(("attn_resolutions", kw["attn_resolutions"], [r for r, a in zip(res, attn) if a]))
    if wrong:
        raise ValueError(f"{net.source}: recorded constructor arguments disagree with the stored tensors "
                         f"(name, recorded, found): {wrong}; the checkpoint is inconsistent")


# ----------------------------------------------------------------------------------------------------------
# Mapping


def split_qkv(weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int):
    """Split EDM's fused 1x1 qkv conv into diffusers' to_q / to_k / to_v linears.

    EDM reshapes the qkv output as (batch * heads, channels_per_head, 3, pixels): output channel
    o = (head * channels_per_head + c) * 3 + {0: q, 1: k, 2: v}. diffusers splits heads as
    (heads, channels_per_head), i.e. feature head * channels_per_head + c, which is what we produce.
    """
    out3, cin = int(weight.shape[0]), int(weight.shape[1])
    c = out3 // 3
    w = weight.reshape(num_heads, c // num_heads, 3, cin)
    b = bias.reshape(num_heads, c // num_heads, 3) if bias is not None else None
    return [(w[:, :, j].reshape(c, cin), b[:, :, j].reshape(c) if b is not None else None) for j in range(3)]


def _is_box_filter(f: torch.Tensor) -> bool:
    return tuple(f.shape) == (1, 1, 2, 2) and torch.allclose(f.float(), torch.full((1, 1, 2, 2), 0.25))


def map_adm_state_dict(sd: dict[str, torch.Tensor], config: dict, head_dim: int | None = None
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """EDM ADM tensors -> diffusers UNet2DModel tensors. Returns (mapped, dropped EDM keys).

    Raises ValueError for EDM tensors that map nowhere (nothing is silently left over)."""
    head_dim = head_dim or config["attention_head_dim"]
    chans = list(config["block_out_channels"])
    n = len(chans)
    res = [config["sample_size"] >> i for i in range(n)]
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src, dst, transform=None):
        t = sd[src]
        used.add(src)
        out[dst] = transform(t) if transform else t

    def block(src, resnet, attn):
        for edm_part, diff_part in _BLOCK_PARTS.items():
            for p in ("weight", "bias"):
                if f"{src}.{edm_part}.{p}" in sd:
                    take(f"{src}.{edm_part}.{p}", f"{resnet}.{diff_part}.{p}")
            rf = f"{src}.{edm_part}.resample_filter"
            if rf in sd:
                # EDM's [1,1] resample filter = nearest-neighbour up / 2x2 average down, as in diffusers.
                if not _is_box_filter(sd[rf]):
                    raise ValueError(f"{rf}: resample filter {sd[rf].flatten().tolist()} is not the [1,1] box "
                                     "filter diffusers' ResnetBlock2D up/down sampling implements")
                used.add(rf)
        if f"{src}.qkv.weight" in sd:
            if attn is None:
                raise ValueError(f"{src} has attention but its diffusers counterpart has none")
            take(f"{src}.norm2.weight", f"{attn}.group_norm.weight")
            take(f"{src}.norm2.bias", f"{attn}.group_norm.bias")
            w, b = sd[f"{src}.qkv.weight"], sd.get(f"{src}.qkv.bias")
            used.update({f"{src}.qkv.weight", f"{src}.qkv.bias"} & sd.keys())
            for name, (wj, bj) in zip(("to_q", "to_k", "to_v"), split_qkv(w, b, int(w.shape[1]) // head_dim)):
                out[f"{attn}.{name}.weight"] = wj
                if bj is not None:
                    out[f"{attn}.{name}.bias"] = bj
            take(f"{src}.proj.weight", f"{attn}.to_out.0.weight", lambda t: t.reshape(t.shape[0], t.shape[1]))
            if f"{src}.proj.bias" in sd:
                take(f"{src}.proj.bias", f"{attn}.to_out.0.bias")

    for p in ("weight", "bias"):
        take(f"map_layer0.{p}", f"time_embedding.linear_1.{p}")
        take(f"map_layer1.{p}", f"time_embedding.linear_2.{p}")
        take(f"enc.{res[0]}x{res[0]}_conv.{p}", f"conv_in.{p}")
        take(f"out_norm.{p}", f"conv_norm_out.{p}")
        take(f"out_conv.{p}", f"conv_out.{p}")
    if "map_label.weight" in sd:
        # EDM: emb += one_hot @ W.T with W (emb, label_dim); nn.Embedding looks rows up: weight = W.T.
        take("map_label.weight", "class_embedding.weight", lambda t: t.t())

    attn_down = [t.startswith("Attn") for t in config["down_block_types"]]
    nb = config["layers_per_block"]
    for lvl, r in enumerate(res):
        for i in range(nb):
            block(f"enc.{r}x{r}_block{i}", f"down_blocks.{lvl}.resnets.{i}",
                  f"down_blocks.{lvl}.attentions.{i}" if attn_down[lvl] else None)
        if lvl > 0:  # EDM's downsampling block opens a level; diffusers' closes the previous one
            block(f"enc.{r}x{r}_down", f"down_blocks.{lvl - 1}.downsamplers.0", None)
        u = n - 1 - lvl
        for i in range(nb + 1):
            block(f"dec.{r}x{r}_block{i}", f"up_blocks.{u}.resnets.{i}",
                  f"up_blocks.{u}.attentions.{i}" if attn_down[lvl] else None)
        if lvl < n - 1:  # EDM's upsampling block opens a level; diffusers' closes the previous one
            block(f"dec.{r}x{r}_up", f"up_blocks.{u - 1}.upsamplers.0", None)
    r = res[-1]
    block(f"dec.{r}x{r}_in0", "mid_block.resnets.0", "mid_block.attentions.0" if config["add_attention"] else None)
    block(f"dec.{r}x{r}_in1", "mid_block.resnets.1", None)

    dropped = sorted(k for k in sd if k not in used and k in _UNUSED_AT_SAMPLING)
    left = sorted(k for k in sd if k not in used and k not in _UNUSED_AT_SAMPLING)
    if left:
        raise ValueError(f"{len(left)} EDM tensors have no place in the diffusers UNet: {left[:8]}")
    return out, dropped


def build_unet(net: EDMNetwork):
    """(UNet2DModel with the network's weights, its config, dropped EDM keys). Validates full coverage."""
    from diffusers import UNet2DModel

    config = adm_unet_config(net)
    mapped, dropped = map_adm_state_dict(net.state_dict, config)
    with torch.device("meta"):  # no random init of hundreds of millions of weights that are replaced anyway
        unet = UNet2DModel(**config)
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    wrong = sorted(k for k in set(expected) & set(mapped) if tuple(mapped[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{net.source}: the EDM network does not fill the diffusers UNet exactly: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes "
            f"{[(k, tuple(mapped[k].shape), expected[k]) for k in wrong[:5]]}")
    # Own, contiguous copies: qkv splits are views of one tensor and safetensors refuses shared storage.
    unet.load_state_dict({k: v.detach().contiguous().clone() for k, v in mapped.items()}, strict=True, assign=True)
    return unet.eval(), config, dropped


# ----------------------------------------------------------------------------------------------------------
# Writing / loading


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _precond_record(net: EDMNetwork, config: dict, dropped: list[str]) -> dict:
    sigma_data = net.precond_attrs.get("sigma_data")
    return {
        "precond": "edm",
        "sigma_data": float(sigma_data) if sigma_data is not None else 0.5,
        "sigma_min": EDM_SIGMA_MIN,
        "sigma_max": EDM_SIGMA_MAX,
        "rho": EDM_RHO,
        "c_noise": "log(sigma)/4",
        "label_dim": int(config["num_class_embeds"] or 0),
        "resolution": int(config["sample_size"]),
        "img_channels": int(config["in_channels"]),
        "architecture": "adm",
        "source": Path(net.source).name,
        "source_sha256": _sha256(Path(net.source)),
        "source_format": net.source_format,
        # a state dict carries no preconditioning record: EDM's defaults were assumed
        "precond_assumed": net.precond_class is None,
        "edm_init_kwargs": {k: v for k, v in net.model_init_kwargs.items() if v is not None},
        "dropped_keys": dropped,
    }


def convert_edm(src: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> dict:
    """Convert `src` and write the folder atomically (temp dir + rename). Returns the precond record."""
    out = Path(out_dir)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; pass --force (force=True) to replace it")
    net = read_edm_network(src)
    unet, config, dropped = build_unet(net)  # every check happens before anything is written
    record = _precond_record(net, config, dropped)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        unet.save_pretrained(str(tmp), safe_serialization=True)
        with open(tmp / PRECOND_FILE, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            os.replace(out, old)  # keep the old output until the new one is in place
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()
    return record


def load_converted(path: str | os.PathLike, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None):
    """Load a folder written by `convert_edm`: (UNet2DModel in eval mode, precond dict)."""
    from diffusers import UNet2DModel

    path = Path(path)
    cfg_file = path / PRECOND_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no {PRECOND_FILE}; convert the EDM checkpoint first with "
                                f"`fdistill convert-edm PKL {path}`")
    with open(cfg_file) as f:
        precond = json.load(f)
    if precond.get("precond") != "edm":
        raise ValueError(f"{cfg_file}: unsupported preconditioning {precond.get('precond')!r}")
    unet = load_unet_folder(path, dtype)
    if device is not None:
        unet = unet.to(device)
    return unet.eval(), precond


def load_unet_folder(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """``UNet2DModel.from_pretrained(path)`` for a teacher folder, its failures (a truncated weights file, the
    weights of another architecture, a missing file) as one CheckpointError naming the folder; diffusers' own
    advice for mismatched sizes would load a different model with random weights, so it is not passed on."""
    from diffusers import UNet2DModel

    try:
        return UNet2DModel.from_pretrained(str(path), torch_dtype=dtype)
    except Exception as e:  # OSError, ValueError, RuntimeError, safetensors' SafetensorError ...
        reason = " ".join(str(e).split())
        reason = re.split(r"\s(?:Please|You can|If you|Set `ignore|ignore_mismatched)", reason)[0][:300]
        raise CheckpointError(f"teacher {path} cannot be loaded as a UNet2DModel ({type(e).__name__}: {reason}). "
                              "It must be the diffusers folder `fdistill convert-edm` writes (config.json and "
                              "diffusion_pytorch_model.safetensors of one model); copy it again if a file is "
                              "truncated") from None


def edm_denoise(unet, precond: dict, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None):
    """EDM's D(x, sigma, y) with a converted UNet: the preconditioning that training uses
    (``fdistill.denoisers.EDMPrecondUNet``), with ``sigma_data`` from the converter's record.

    `class_labels`: integer class indices (N,), or label vectors (N, label_dim) as EDM takes them (one-hot,
    or any vector: the label embedding is linear, so e.g. a zero vector gives the label-free embedding)."""
    if unet.class_embedding is not None and class_labels is None:
        raise ValueError("this teacher is class-conditional: pass class_labels")
    return EDMPrecondUNet(unet, float(precond["sigma_data"]), ()).denoise(x, sigma, class_labels)
