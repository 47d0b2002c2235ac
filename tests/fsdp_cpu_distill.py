"""train/distill.py with accelerate's FSDP code path on CPU processes (gloo); tests launch it with
`accelerate launch --use_fsdp --fsdp_version {1,2} --num_processes 2 tests/fsdp_cpu_distill.py CONFIG ...`.

accelerate enables FSDP only on accelerators: on CPU it sets MULTI_CPU and silently runs DDP, ignoring the
FSDP plugin (accelerate/state.py, AcceleratorState.__init__). torch's FSDP1 and FSDP2 themselves run on CPU with
gloo, so this switches the state to FSDP right after accelerate set it up; from there the trainer goes through
accelerate's FSDP preparation, clipping, no_sync and state-dict code exactly as it does on GPUs.
"""
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

if __name__ == "__main__":
    from fdistill.cli import main

    sys.exit(main(["distill", *sys.argv[1:]]))
