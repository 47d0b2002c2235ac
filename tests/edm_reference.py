"""EDM-format checkpoints built by the tests, and a functional reference of EDM's ADM network.

Modules pickle exactly as `torch_utils.persistence` objects do (a call `_reconstruct_persistent_obj(meta)` with
the class source and the instance state), nested in real `torch.nn.ModuleDict`s, with EDM's parameter names and
random values. A small functional reimplementation of ADM's math from those names is the reference the
converted UNet is checked against. Shared by test_convert_edm.py and test_imagenet64.py.
"""

import contextlib
import math
import pickle
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

SMALL = dict(img_resolution=8, in_channels=3, model_channels=128, channel_mult=[1, 2], num_blocks=1,
             attn_resolutions=[4], label_dim=10)


# ----------------------------------------------------------------------------------------------------------
# EDM-format checkpoint builder


@contextlib.contextmanager
def fake_torch_utils():
    """Register a stand-in `torch_utils.persistence` so pickle can name `_reconstruct_persistent_obj`."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # would exec meta['module_src'] in EDM; must never be called here
        raise AssertionError("the real persistence loader was called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = pkg, mod
    try:
        yield mod
    finally:
        sys.modules.pop("torch_utils", None)
        sys.modules.pop("torch_utils.persistence", None)


class _Persistent(torch.nn.Module):
    edm_class = "?"
    module_src = "raise RuntimeError('module source executed')\n"

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=type(self).module_src, class_name=self.edm_class,
                    state=dict(self.__dict__))
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))


_CLASSES = {}


def node(cls_name, init_kwargs=None, **attrs):
    cls = _CLASSES.setdefault(cls_name, type(cls_name, (_Persistent,), {"edm_class": cls_name}))
    m = cls()
    m._init_args, m._init_kwargs = (), dict(init_kwargs or {})
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def _p(*shape, scale=None):
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return torch.nn.Parameter(torch.randn(*shape) * (scale if scale is not None else fan_in ** -0.5))


def linear(i, o, bias=True):
    m = node("Linear", in_features=i, out_features=o)
    m.weight = _p(o, i)
    m.bias = _p(o, scale=0.1) if bias else None
    return m


def conv(i, o, k, up=False, down=False):
    m = node("Conv2d", in_channels=i, out_channels=o, up=up, down=down, fused_resample=False)
    m.weight = _p(o, i, k, k) if k else None
    m.bias = _p(o, scale=0.1) if k else None
    f = torch.ones(1, 1, 2, 2) / 4
    m.register_buffer("resample_filter", f if (up or down) else None)
    return m


def groupnorm(c, eps=1e-5):
    m = node("GroupNorm", num_groups=min(32, c // 4), eps=eps)
    m.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(c))
    m.bias = _p(c, scale=0.1)
    return m


def unet_block(cin, cout, emb, up=False, down=False, attention=False):
    heads = cout // 64 if attention else 0
    init = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))  # numpy scalars
    m = node("UNetBlock", dict(in_channels=cin, out_channels=cout, emb_channels=emb, up=up, down=down,
                               attention=attention, init=init), in_channels=cin, out_channels=cout, emb_channels=emb,
             num_heads=heads, dropout=0.1, skip_scale=1, adaptive_scale=True)
    m.norm0 = groupnorm(cin)
    m.conv0 = conv(cin, cout, 3, up=up, down=down)
    m.affine = linear(emb, 2 * cout)
    m.norm1 = groupnorm(cout)
    m.conv1 = conv(cout, cout, 3)
    m.skip = None
    if cout != cin or up or down:
        m.skip = conv(cin, cout, 1 if cout != cin else 0, up=up, down=down)
    if heads:
        m.norm2 = groupnorm(cout)
        m.qkv = conv(cout, 3 * cout, 1)
        m.proj = conv(cout, cout, 1)
    return m


def dhariwal_unet(img_resolution, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
                  label_dim, augment_dim=0, channel_mult_emb=4):
    """ADM's layout in EDM's names (written from the architecture description, checked by the tests)."""
    emb = model_channels * channel_mult_emb
    kw = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=in_channels,
              label_dim=label_dim, augment_dim=augment_dim, model_channels=model_channels,
              channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn_resolutions, dropout=0.1)
    m = node("DhariwalUNet", kw, label_dropout=0)
    m.map_noise = node("PositionalEmbedding", num_channels=model_channels, max_positions=10000, endpoint=False)
    m.map_augment = linear(augment_dim, model_channels, bias=False) if augment_dim else None
    m.map_layer0 = linear(model_channels, emb)
    m.map_layer1 = linear(emb, emb)
    m.map_label = linear(label_dim, emb, bias=False) if label_dim else None
    m.enc = torch.nn.ModuleDict()
    cout = in_channels
    for level, mult in enumerate(channel_mult):
        r = img_resolution >> level
        if level == 0:
            cin, cout = cout, model_channels * mult
            m.enc[f"{r}x{r}_conv"] = conv(cin, cout, 3)
        else:
            m.enc[f"{r}x{r}_down"] = unet_block(cout, cout, emb, down=True)
        for i in range(num_blocks):
            cin, cout = cout, model_channels * mult
            m.enc[f"{r}x{r}_block{i}"] = unet_block(cin, cout, emb, attention=r in attn_resolutions)
    skips = [b.out_channels for b in m.enc.values()]
    m.dec = torch.nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
        r = img_resolution >> level
        if level == len(channel_mult) - 1:
            m.dec[f"{r}x{r}_in0"] = unet_block(cout, cout, emb, attention=True)
            m.dec[f"{r}x{r}_in1"] = unet_block(cout, cout, emb)
        else:
            m.dec[f"{r}x{r}_up"] = unet_block(cout, cout, emb, up=True)
        for i in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            m.dec[f"{r}x{r}_block{i}"] = unet_block(cin, cout, emb, attention=r in attn_resolutions)
    m.out_norm = groupnorm(cout)
    m.out_conv = conv(cout, in_channels, 3)
    return m


def edm_precond(cls_name="EDMPrecond", **kw):
    net = dhariwal_unet(**{**SMALL, **kw})
    k = net._init_kwargs
    root = node(cls_name, dict(img_resolution=k["img_resolution"], img_channels=k["in_channels"],
                               label_dim=k["label_dim"], model_type="DhariwalUNet"),
                img_resolution=k["img_resolution"], img_channels=k["in_channels"], label_dim=k["label_dim"],
                use_fp16=False, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5)
    root.model = net
    return root


def write_edm_pickle(path, root):
    with fake_torch_utils():
        data = dict(ema=root, loss_fn=node("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5),
                    augment_pipe=None, dataset_kwargs=dict(path="imagenet-64x64.zip", use_labels=True))
        with open(path, "wb") as f:
            pickle.dump(data, f)
    assert "torch_utils" not in sys.modules  # the loader cannot fall back to it


def flat_state(root):
    """EDM's own state_dict names (what a .pth of net.state_dict() would hold)."""
    return {k: v.detach().clone() for k, v in root.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# Reference: ADM's forward written from EDM's parameter names


def _gn(sd, p, x):
    c = x.shape[1]
    return F.group_norm(x, min(32, c // 4), sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)


def _conv(sd, p, x, up=False, down=False):
    c = x.shape[1]
    if up:  # EDM: transposed conv with the [1,1] filter (x4), stride 2
        x = F.conv_transpose2d(x, torch.ones(c, 1, 2, 2), groups=c, stride=2)
    if down:  # EDM: conv with the [1,1]/4 filter, stride 2
        x = F.conv2d(x, torch.full((c, 1, 2, 2), 0.25), groups=c, stride=2)
    if p + ".weight" in sd:
        w = sd[p + ".weight"]
        x = F.conv2d(x, w, sd.get(p + ".bias"), padding=w.shape[-1] // 2)
    return x


def edm_attention(sd, p, x, heads):
    n, c, h, w = x.shape
    qkv = _conv(sd, p + ".qkv", _gn(sd, p + ".norm2", x))
    q, k, v = qkv.reshape(n * heads, c // heads, 3, h * w).unbind(2)
    wts = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", wts, v)
    return _conv(sd, p + ".proj", a.reshape(n, c, h, w)) + x


def edm_block(sd, p, x, emb):
    up, down = p.endswith("_up"), p.endswith("_down")
    h = _conv(sd, p + ".conv0", F.silu(_gn(sd, p + ".norm0", x)), up, down)
    scale, shift = F.linear(emb, sd[p + ".affine.weight"], sd[p + ".affine.bias"])[:, :, None, None].chunk(2, 1)
    h = F.silu(shift + _gn(sd, p + ".norm1", h) * (scale + 1))
    h = _conv(sd, p + ".conv1", h)
    skip = _conv(sd, p + ".skip", x, up, down) if (up or down or p + ".skip.weight" in sd) else x
    x = h + skip
    if p + ".qkv.weight" in sd:
        x = edm_attention(sd, p, x, x.shape[1] // 64)
    return x


def edm_unet_forward(sd, enc_names, dec_names, x, c_noise, onehot):
    mc = sd["map_layer0.weight"].shape[1]
    freqs = (1 / 10000) ** (torch.arange(mc // 2, dtype=torch.float32) / (mc // 2))
    e = torch.outer(c_noise, freqs)
    emb = torch.cat([e.cos(), e.sin()], dim=1)
    emb = F.silu(F.linear(emb, sd["map_layer0.weight"], sd["map_layer0.bias"]))
    emb = F.linear(emb, sd["map_layer1.weight"], sd["map_layer1.bias"])
    if "map_label.weight" in sd:
        emb = emb + F.linear(onehot, sd["map_label.weight"])
    emb = F.silu(emb)
    skips = []
    for name in enc_names:
        p = "enc." + name
        x = _conv(sd, p, x) if name.endswith("_conv") else edm_block(sd, p, x, emb)
        skips.append(x)
    for name in dec_names:
        p = "dec." + name
        if x.shape[1] != sd[p + ".norm0.weight"].shape[0]:
            x = torch.cat([x, skips.pop()], dim=1)
        x = edm_block(sd, p, x, emb)
    return _conv(sd, "out_conv", F.silu(_gn(sd, "out_norm", x)))


def edm_reference_denoiser(root, x, sigma, onehot):
    sd = {k[len("model."):]: v for k, v in flat_state(root).items()}
    s = sigma.reshape(-1, 1, 1, 1)
    sdata = 0.5
    c_skip = sdata ** 2 / (s ** 2 + sdata ** 2)
    c_out = s * sdata / (s ** 2 + sdata ** 2).sqrt()
    c_in = 1 / (sdata ** 2 + s ** 2).sqrt()
    Fx = edm_unet_forward(sd, list(root.model.enc.keys()), list(root.model.dec.keys()), c_in * x,
                          sigma.log() / 4, onehot)
    return c_skip * x + c_out * Fx
