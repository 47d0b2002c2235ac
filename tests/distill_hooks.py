"""``fdistill distill`` with the tests' callbacks (``fdistill.trainer.Callback``), chosen by the environment:

    DISTILL_KILL_AT_STEP=N   SIGKILL this process right after generator step N (no cleanup): exact resumption
    DISTILL_DUMP_RANKS=1     every process writes its final generator to OUT/rank{R}_generator.safetensors, so
                             that the tests can compare the processes' weights

Run as ``python tests/distill_hooks.py CONFIG key=value ...`` or ``accelerate launch tests/distill_hooks.py ...``;
``tests/fsdp_cpu_distill.py`` installs the same hooks (``install``).
"""
import functools
import os
import signal
import sys

from safetensors.torch import save_file

from fdistill.commands import distill as command
from fdistill.trainer import Callback


class KillAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, step, run):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpRanks(Callback):
    def on_train_end(self, run):
        sd = run.generator_state_dict()  # on every process: a collective under FSDP
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()},
                  str(run.run_dir / f"rank{run.rank}_generator.safetensors"))


def hooks_from_env() -> list[Callback]:
    hooks: list[Callback] = []
    if "DISTILL_KILL_AT_STEP" in os.environ:
        hooks.append(KillAtStep(int(os.environ["DISTILL_KILL_AT_STEP"])))
    if os.environ.get("DISTILL_DUMP_RANKS"):
        hooks.append(DumpRanks())
    return hooks


def install() -> None:
    """The distill command (which fdistill.cli looks up when it runs) with these callbacks."""
    command.main_from_args = functools.partial(command.main_from_args, callbacks=hooks_from_env())


if __name__ == "__main__":
    from fdistill.cli import main

    install()
    sys.exit(main(["distill", *sys.argv[1:]]))
