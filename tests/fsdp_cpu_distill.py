"""train/distill.py with accelerate's FSDP code path on CPU processes (gloo); tests launch it with
`accelerate launch --use_fsdp --fsdp_version {1,2} --num_processes 2 tests/fsdp_cpu_distill.py CONFIG ...`.

accelerate enables FSDP only on accelerators: on CPU it sets MULTI_CPU and silently runs DDP, ignoring the
FSDP plugin (accelerate/state.py, AcceleratorState.__init__). torch's FSDP1 and FSDP2 themselves run on CPU with
gloo, so this switches the state to FSDP right after accelerate set it up; from there the trainer goes through
accelerate's FSDP preparation, clipping, no_sync and state-dict code, and torch's sharded collectives. Not
through every line the GPUs run, though:
- fdistill.parallel branches on the device where it gathers the optimizer states for a checkpoint
  (Parallel.gather_optimizer_states): on GPUs to the main process's CPU memory alone (cpu_offload=True); on a
  CPU device, as here, to every process (cpu_offload=False), because FSDP1 there returns views of one reused
  buffer. The GPU path of that gather is not run by these tests;
- gloo instead of NCCL, and tensors that stay on the CPU: torch's own device moves (the offload to CPU, the
  resume's broadcast of optimizer states through the device) are no-ops here;
- the tests turn off accelerate's sync_module_states and cpu_ram_efficient_loading (see tests/test_fsdp.py).

It also reports, for the tests, which process reads optimizer states from a checkpoint, and (FSDP2) every
unit's reshard-after-forward setting before and after each evaluation that gathers the networks
(Parallel.full_params), so that the tests can check an evaluation leaves them as they were.
"""
import contextlib
import sys

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        # accelerate names the CPU 'cpu:0', which FSDP1 takes for another device than its parameters' 'cpu'
        self.device = torch.device("cpu")
        PartialState._shared_state.update(distributed_type=DistributedType.FSDP, device=self.device)


AcceleratorState.__init__ = _init_fsdp_on_cpu
_prepare = Accelerator.prepare


def _prepare_and_report(self, *args, **kwargs):
    """Says what accelerate wrapped each network in, so that the tests know FSDP was in force."""
    out = _prepare(self, *args, **kwargs)
    for obj in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(obj, torch.nn.Module):
            kind = type(obj).__name__ if isinstance(obj, FullyShardedDataParallel) else \
                "FSDPModule" if isinstance(obj, FSDPModule) else type(obj).__name__
            print(f"[fsdp_cpu_distill] rank {self.process_index}: prepared {kind}", flush=True)
    return out


Accelerator.prepare = _prepare_and_report


def _reshard_settings(nets) -> str:
    """FSDP2: whether each parameter group of every unit reshards after forward (T/F, in module order), read from
    torch's state: a group reshards after forward when it has a post-forward mesh. FSDP1: empty."""
    return "".join("T" if g.post_forward_mesh_info is not None else "F"
                   for net in nets for m in net.modules() if isinstance(m, FSDPModule)
                   for g in m._get_fsdp_state()._fsdp_param_groups)


def _report_full_params(full_params):
    @contextlib.contextmanager
    def wrapped(par, nets):
        nets = list(nets)
        before = _reshard_settings(nets)
        with full_params(par, nets):
            yield
        print(f"[fsdp_cpu_distill] rank {par.accelerator.process_index}: reshard_after_forward around an evaluation: "
              f"before {before} after {_reshard_settings(nets)}", flush=True)
    return wrapped


if __name__ == "__main__":
    from distill_hooks import install  # this script's folder (tests/) is on sys.path

    from fdistill import trainer
    from fdistill.cli import main
    from fdistill.parallel import Parallel

    install()  # the tests' callbacks: DISTILL_KILL_AT_STEP, DISTILL_DUMP_RANKS

    Parallel.full_params = _report_full_params(Parallel.full_params)
    _read_optimizer = trainer.ckpt.read_optimizer

    def _report_read_optimizer(folder, name):
        print(f"[fsdp_cpu_distill] rank {PartialState().process_index}: read optimizer {name}", flush=True)
        return _read_optimizer(folder, name)

    trainer.ckpt.read_optimizer = _report_read_optimizer
    sys.exit(main(["distill", *sys.argv[1:]]))
