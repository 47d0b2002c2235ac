"""LoRA students: the generator and the fake score as two low-rank adapters on the teacher's one frozen network.

Full fine-tuning holds three copies of the teacher's network (frozen teacher, generator, fake score) plus two sets
of AdamW moments; a 12B FLUX.1 never fits that on one GPU. With LoRA (Hu et al. 2021; ``peft``) both students are
adapters W + (alpha / r) B A on the *same* base weights: the teacher pass is the base with adapters disabled, the
generator pass activates adapter "generator", the fake-score pass adapter "fake". The base is held once, in the
teacher's precision; only the adapters are trainable, registered in the student modules (so optimizers,
checkpoints and DDP see the adapters only), while the base belongs to the teacher module.

B starts at zero (peft's default), so at initialisation both students equal the teacher exactly, as the full
fine-tuning recipe starts them (f-distill paper, s.4: generator and fake score initialised from the teacher).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from .denoisers import Denoiser

ADAPTERS = ("generator", "fake")


@dataclass
class LoraSpec:
    rank: int = 0
    """Adapter rank r (0 = no LoRA: full fine-tuning)."""
    alpha: float = 0.0
    """Scale numerator: the update is (alpha / r) B A; 0 = r (scale 1, as diffusers' training examples)."""
    targets: list = field(default_factory=list)
    """Module names (or name suffixes) the adapters wrap, e.g. to_q, to_k, to_v, to_out.0."""

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank


def lora_layers(net: nn.Module) -> dict:
    """{module path: peft LoRA layer} of a network with injected adapters."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in net.named_modules() if isinstance(m, LoraLayer)}


def inject(net: nn.Module, spec: LoraSpec, names=ADAPTERS) -> dict:
    """Add one LoRA adapter per name to ``net`` (in place); freeze the base, leave the adapters trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    if spec.rank <= 0:
        raise ValueError(f"lora rank must be positive, got {spec.rank}")
    if not spec.targets:
        raise ValueError("lora targets are empty: name the modules to adapt (e.g. to_q, to_k, to_v, to_out.0)")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, target_modules=list(spec.targets),
                        lora_dropout=0.0, bias="none")
    for name in names:
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the design
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(config, net, adapter_name=name)
        except ValueError as e:
            raise ValueError(f"lora targets {spec.targets} match no module of {type(net).__name__} ({e}); "
                             "name modules such as to_q, to_k, to_v, to_out.0") from None
    for pname, p in net.named_parameters():
        p.requires_grad_("lora_" in pname)
    return lora_layers(net)


@contextlib.contextmanager
def adapter_active(layers: dict, name: str | None):
    """Run the base with one adapter active (``name``) or with all adapters disabled (None). Set on the layers'
    own flags, not with peft's ``set_adapter``, which would also flip ``requires_grad`` of the adapters."""
    old = [(m._active_adapter, m._disable_adapters) for m in layers.values()]
    for m in layers.values():
        if name is None:
            m._disable_adapters = True
        else:
            m._active_adapter, m._disable_adapters = [name], False
    try:
        yield
    finally:
        for m, (a, d) in zip(layers.values(), old):
            m._active_adapter, m._disable_adapters = a, d


def enable_gradient_checkpointing(net: nn.Module, layers: dict) -> None:
    """Gradient checkpointing of a diffusers network whose adapters are switched per pass.

    A checkpointed block recomputes its forward during backward, after ``adapter_active`` has restored the
    layers' state: it would recompute with another adapter (or none) than the pass it belongs to, and silently
    give wrong gradients where the shapes agree (the generator's and the fake score's adapters). So each
    checkpoint records the adapter state at its forward and recomputes under it (``context_fn``)."""

    def checkpoint_fn(module, *args):
        state = [(m._active_adapter, m._disable_adapters) for m in layers.values()]

        @contextlib.contextmanager
        def recompute_under_forward_state():
            old = [(m._active_adapter, m._disable_adapters) for m in layers.values()]
            for m, (a, d) in zip(layers.values(), state):
                m._active_adapter, m._disable_adapters = a, d
            try:
                yield
            finally:
                for m, (a, d) in zip(layers.values(), old):
                    m._active_adapter, m._disable_adapters = a, d

        return checkpoint(module.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), recompute_under_forward_state()))

    net.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_fn)


def _key(path: str) -> str:
    return path.replace(".", "__")


class AdapterView(Denoiser):
    """A denoiser on a shared base with one adapter active (``adapter``) or none (None: the teacher).

    With an adapter, only that adapter's A and B are registered (``self.lora``); the inner denoiser and its base
    are referenced, not registered. Without one (the teacher view) the inner denoiser is registered: the base
    belongs to the teacher.
    """

    def __init__(self, inner: Denoiser, layers: dict, adapter: str | None):
        super().__init__(None, ())
        self.adapter = adapter
        object.__setattr__(self, "_layers", layers)
        if adapter is None:
            self.inner = inner
        else:
            object.__setattr__(self, "inner", inner)
            self.lora = nn.ModuleDict({_key(p): nn.ModuleDict({"A": m.lora_A[adapter], "B": m.lora_B[adapter]})
                                       for p, m in layers.items()})

    def prior_scale(self, sigma: float) -> float:
        return self.inner.prior_scale(sigma)

    def denoise(self, x_t, sigma, cond=None):
        return self.forward(x_t, sigma, cond)

    def forward(self, x_t, sigma, cond=None, mode: str = "x0", x0_grad: bool = True):
        if mode not in self.calls:
            raise ValueError(f"mode must be one of {list(self.calls)}, got {mode!r}")
        self.calls[mode] += 1
        with adapter_active(self._layers, self.adapter):
            return self.inner(x_t, sigma, cond, mode=mode, x0_grad=x0_grad)

    def __deepcopy__(self, memo):
        raise TypeError("a LoRA student shares its base with the teacher and cannot be deep-copied (an EMA of it "
                        "is not supported: set ema: [] with LoRA)")


def lora_networks(net: nn.Module, spec: LoraSpec, make_denoiser: Callable[[nn.Module], Denoiser],
                  gradient_checkpointing: bool = False):
    """(generator denoiser, fake-score denoiser, teacher denoiser): adapter views of one base ``net``."""
    layers = inject(net, spec)
    if gradient_checkpointing:
        enable_gradient_checkpointing(net, layers)
    inner = make_denoiser(net)
    return (AdapterView(inner, layers, "generator").train(), AdapterView(inner, layers, "fake").train(),
            AdapterView(inner, layers, None).eval())


def adapter_state(sd: dict, marker: str = "denoiser.lora.") -> dict:
    """{module path: (A weight, B weight)} from a generator state dict of a LoRA run."""
    out: dict = {}
    for k, v in sd.items():
        if marker not in k:
            continue
        rest = k.split(marker, 1)[1]  # <path key>.A.weight
        path_key, which, _ = rest.rsplit(".", 2)
        out.setdefault(path_key.replace("__", "."), {})[which] = v
    if not out:
        raise ValueError(f"no LoRA adapter weights (keys '*{marker}*') in the generator's state dict")
    return {p: (ab["A"], ab["B"]) for p, ab in out.items()}


@torch.no_grad()
def merge(net: nn.Module, adapters: dict, scale: float) -> nn.Module:
    """W <- W + scale B A for each adapted Linear of ``net`` (in place)."""
    for path, (A, B) in adapters.items():
        lin = net.get_submodule(path)
        delta = (B.double() @ A.double()) * scale
        lin.weight.copy_((lin.weight.double() + delta.to(lin.weight.device)).to(lin.weight.dtype))
    return net


def lora_weights_for_pipeline(adapters: dict, prefix: str, scale: float) -> dict:
    """The adapters in diffusers' LoRA format (``<prefix>.<path>.lora_A/B.weight``); the scale is folded into B so
    that the loader's default alpha = r reproduces the trained update exactly."""
    out = {}
    for path, (A, B) in adapters.items():
        out[f"{prefix}.{path}.lora_A.weight"] = A.contiguous()
        out[f"{prefix}.{path}.lora_B.weight"] = (B * scale).contiguous()
    return out


def save_lora_weights(adapters: dict, prefix: str, scale: float, out_dir) -> Path:

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(lora_weights_for_pipeline(adapters, prefix, scale), str(out / "pytorch_lora_weights.safetensors"))
    return out


__all__ = ["LoraSpec", "inject", "adapter_active", "AdapterView", "lora_networks", "enable_gradient_checkpointing",
           "adapter_state", "merge", "lora_weights_for_pipeline", "save_lora_weights"]
