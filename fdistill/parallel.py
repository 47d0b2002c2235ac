"""Where one process / DDP and FSDP (1 and 2) differ, in one object: the trainer asks ``Parallel`` and never
branches on the kind of parallelism itself.

Under DDP (and on one process) every process holds whole networks and optimizer states; under FSDP each holds
shards, so clipping, checkpoints, EMA updates and evaluation gather them (collectives: every process calls the
method). accelerate prepares the networks; torch.distributed.checkpoint's state-dict API gathers and scatters.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch

from . import checkpoint as ckpt
from .config import DistillConfig
from .generator import unwrap


class OptimPart(NamedTuple):
    """One trainable network with its optimizer. A checkpoint's optimizer state is one or several of these."""
    net: torch.nn.Module  # prepared (wrapped, under FSDP sharded)
    opt: torch.optim.Optimizer  # accelerate's wrapper of it
    names: list[str]  # parameter names in the optimizer's order, taken before any wrapper renamed them


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) as the ordinary tensor it stands for."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _FullParams:
    """What ``AveragedModel.update_parameters`` reads from a model (parameters(), buffers(), in ``like``'s order),
    taken from a full state dict: the EMA of a sharded generator is updated from its gathered parameters."""

    def __init__(self, like: torch.nn.Module, state: dict):
        self.like, self.state = like, state

    def parameters(self):
        return (self.state[n] for n, _ in self.like.named_parameters())

    def buffers(self):  # non-persistent buffers are not in a state dict: constants, left as they are
        return (self.state.get(n, b) for n, b in self.like.named_buffers())


def _reshard_setting(unit):
    """An FSDP2 unit's reshard-after-forward setting, as torch holds it. It differs between units: accelerate
    wraps the root with None, which torch resolves to no resharding at the first forward (the parameters would
    be gathered again at once for the backward), the inner units with the plugin's value. The public
    ``set_reshard_after_forward`` takes a bool and cannot say None, hence torch's private fields."""
    state = unit._get_fsdp_state()
    return state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]


def _set_reshard_setting(unit, setting):
    state = unit._get_fsdp_state()
    state._auto_reshard_after_forward, meshes = setting
    for group, mesh in zip(state._fsdp_param_groups, meshes, strict=True):
        group.post_forward_mesh_info = mesh


class Parallel:
    """The accelerator's kind of parallelism (one process, DDP, FSDP1, FSDP2) behind one interface."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        # DistributedType is a str enum: compared by value, without importing accelerate here
        self.is_fsdp = accelerator.distributed_type == "FSDP"
        self.is_fsdp2 = self.is_fsdp and bool(accelerator.is_fsdp2)

    def check(self, cfg: DistillConfig, task) -> None:
        """Refuse up front what would fail or hang later under FSDP (docs: parallel training, limits)."""
        if not self.is_fsdp:
            return
        if cfg.compile:
            raise ValueError("compile=true is not supported under FSDP (it would wrap the compiled module); let "
                             "accelerate compile instead (accelerate launch --dynamo_backend inductor)")
        if self.is_fsdp2:
            return
        # FSDP1 replaces a network's parameters by flat shards: only its wrapper's forward can run it.
        if cfg.ratio == "oracle":
            raise ValueError("ratio=oracle calls the generator outside its FSDP1 wrapper (the oracle's density "
                             "estimate of its samples), where FSDP1 leaves only flat shards of its parameters; run "
                             "it under FSDP2 (accelerate launch --fsdp_version 2) or DDP")
        if task.evaluate_uses_networks and self.accelerator.state.fsdp_plugin.auto_wrap_policy is not None:
            raise ValueError(f"pipeline {cfg.pipeline} evaluates through its own references to the networks, and "
                             "FSDP1 with an auto-wrap policy makes nested units, which cannot run on one process: "
                             "the evaluation would hang. Use FSDP2 (accelerate launch --fsdp_version 2), or FSDP1 "
                             "without an auto-wrap policy (--fsdp_auto_wrap_policy NO_WRAP)")

    def prepare(self, net, opt):
        """accelerator.prepare(net, opt). FSDP2 looks the transformer-wrap classes up in each model and refuses a
        model that lacks one; the networks differ (the discriminator head has no UNet blocks), so each is wrapped
        at those of the classes it has (none: one unit)."""
        acc = self.accelerator
        plugin = getattr(acc.state, "fsdp_plugin", None) if self.is_fsdp else None
        classes = getattr(plugin, "transformer_cls_names_to_wrap", None) if self.is_fsdp2 else None
        if not classes:
            return acc.prepare(net, opt)
        present = {type(m).__name__ for m in net.modules()}
        plugin.transformer_cls_names_to_wrap = [c for c in classes if c in present]
        try:
            return acc.prepare(net, opt)
        finally:
            plugin.transformer_cls_names_to_wrap = classes

    def grad_norm(self, net, clip: float) -> torch.Tensor:
        """Clip the prepared ``net``'s gradients to norm ``clip`` (0: no clipping); returns the norm of the whole
        gradient before clipping, also under FSDP, where each process holds shards."""
        max_norm = clip if clip and clip > 0 else float("inf")
        if not self.is_fsdp:
            norm = self.accelerator.clip_grad_norm_(net.parameters(), max_norm)
        # Under FSDP, what accelerator.clip_grad_norm_ calls, without its search for the model: it compares
        # parameter lists with ==, which raises for two models of one architecture (generator and fake score).
        elif self.is_fsdp2:
            norm = torch.nn.utils.clip_grad_norm_(list(net.parameters()), max_norm)  # DTensor grads: global norm
        else:
            norm = net.clip_grad_norm_(max_norm)  # FSDP1's own: reduced over the shards
        return _plain(norm)

    def full_state_dict(self, net) -> dict:
        """A prepared network's full state dict on every process, on its device. Collective under FSDP."""
        if not self.is_fsdp:
            return unwrap(net).state_dict()
        # heavy: torch.distributed.checkpoint imports the distributed stack, needed only under FSDP
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))

    def ema_source(self, generator, like: torch.nn.Module):
        """What an EMA of the prepared ``generator`` is updated from: the module itself, or under FSDP its
        gathered parameters (one all-gather, a transient full copy per process; collective) in ``like``'s
        order."""
        if not self.is_fsdp:
            return unwrap(generator)
        return _FullParams(like, self.full_state_dict(generator))

    def gather_weights(self, nets: dict) -> dict:
        """Name -> what a checkpoint saves of each prepared network: under FSDP its full state dict, gathered on
        the main process (collective); otherwise the live module."""
        if not self.is_fsdp:
            return {name: unwrap(net) for name, net in nets.items()}
        return {name: self.accelerator.get_state_dict(net) for name, net in nets.items()}

    def weights_for_evaluation(self, generator):
        """The prepared generator's full weights on the main process (collective under FSDP), or None where the
        plain module can run as it is (no FSDP)."""
        return self.accelerator.get_state_dict(generator) if self.is_fsdp else None

    @contextlib.contextmanager
    def full_params(self, nets):
        """Inside, every prepared network holds its whole parameters on every process, so that the main process
        can run one alone (evaluation) while the others wait; outside FSDP it does nothing. Every process enters
        it. Costs one full copy of each network per process while it lasts. On leaving, FSDP2's units reshard
        after forward exactly as they did before."""
        if not self.is_fsdp:
            yield
            return
        if self.is_fsdp2:
            from torch.distributed.fsdp import FSDPModule  # heavy: the distributed stack, only under FSDP

            units = [m for net in nets for m in net.modules() if isinstance(m, FSDPModule)]
            saved = [_reshard_setting(u) for u in units]
            for u in units:  # gather now and keep: forwards on one process must not all-gather again
                u.unshard()
                u.set_reshard_after_forward(False, recurse=False)
            try:
                yield
            finally:
                for u, setting in zip(units, saved):
                    u.reshard()
                    _set_reshard_setting(u, setting)
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # heavy, as above

            # the unwrapped modules then hold the full parameters; the FSDP wrappers must not be called inside
            with contextlib.ExitStack() as stack:
                for net in nets:
                    stack.enter_context(FSDP.summon_full_params(net, writeback=False))
                yield

    def gather_optimizer_states(self, parts: dict[str, list[OptimPart]]) -> dict | None:
        """Checkpoint name -> full optimizer state dict, keyed by parameter index as a plain optimizer's, on the
        main process (None elsewhere). Under FSDP each process holds shards of the states: they are gathered by
        parameter name (collective) and re-keyed by index, so the files are those a single process writes."""
        acc = self.accelerator
        if not self.is_fsdp:
            return {key: ckpt.merge_optim_states([p.opt.state_dict() for p in ps]) for key, ps in parts.items()} \
                if acc.is_main_process else None
        # heavy: torch.distributed.checkpoint imports the distributed stack, needed only under FSDP
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # On GPUs gathered to the main process's CPU memory alone. On a CPU device FSDP1 relies on .cpu() to copy
        # each state out of one reused gather buffer (a no-op there, so exp_avg came back equal to exp_avg_sq):
        # there every process gathers, which clones.
        options = StateDictOptions(full_state_dict=True, cpu_offload=acc.device.type != "cpu")
        out = {}
        for key, ps in parts.items():
            sds = [get_optimizer_state_dict(p.net, p.opt.optimizer, options=options) for p in ps]
            if acc.is_main_process:
                out[key] = ckpt.merge_optim_states([ckpt.optim_state_by_index(sd, p.names)
                                                    for sd, p in zip(sds, ps)])
        return out if acc.is_main_process else None

    def load_optimizer_states(self, parts: dict[str, list[OptimPart]], folder: Path) -> None:
        """Resume the optimizers from the checkpoint ``folder``. Under FSDP the main process alone reads the full
        states and broadcasts them, and every process keeps its shard: one full copy in host memory rather than
        one per process (an SD1.5 UNet's AdamW state is ~7 GB). Collective under FSDP."""
        if not self.is_fsdp:
            for key, ps in parts.items():
                sds = ckpt.split_optim_state(ckpt.read_optimizer(folder, key), [len(p.names) for p in ps])
                for p, sd in zip(ps, sds):
                    p.opt.load_state_dict(sd)
            return
        # heavy: torch.distributed.checkpoint imports the distributed stack, needed only under FSDP
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        for key, ps in parts.items():
            sds = ckpt.split_optim_state(ckpt.read_optimizer(folder, key), [len(p.names) for p in ps]) \
                if self.accelerator.is_main_process else [None] * len(ps)
            for p, sd in zip(ps, sds):  # the other processes pass an empty state and receive theirs
                full = ckpt.optim_state_by_name(sd, p.names) if sd is not None else {}
                set_optimizer_state_dict(p.net, p.opt.optimizer, full, options=options)
