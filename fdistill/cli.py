"""The ``fdistill`` command."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from .commands import DEBUG_ENV, EXIT_INTERRUPTED, call, debugging

COMMANDS = {
    "distill": "distill a teacher into a one-step generator: fdistill distill CONFIG [key=value ...] [--dry-run]",
    "demo": "the embedded default: distill the shipped MNIST teacher on CPU, with FID and sample grids",
    "sample": "generate images from a run directory, checkpoint or exported folder",
    "export": "write a generator as a diffusers-format folder (OneStepPipeline / StableDiffusionPipeline)",
    "eval": "metrics: fid, ref (reference statistics), pr (precision/recall), clip (CLIP score), coco (COCO-30k)",
    "convert-edm": "convert an NVlabs EDM network pickle to a diffusers UNet2DModel folder, without executing it",
    "lm": "f-divergence LM alignment: dpo, tdpo, fdpg, dph, demo",
}


def _help() -> str:
    lines = ["usage: fdistill COMMAND [ARGS]", "",
             "One-step diffusion distillation with f-divergence distribution matching (f-distill).", "",
             "commands:"]
    lines += [f"  {name:<12} {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run `fdistill COMMAND --help` for a command's options."]
    return "\n".join(lines)


def _distill(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="fdistill distill",
        description="Distill a teacher into a one-step generator with an f-divergence. The run directory "
                    "(out=...) gets config.yaml, metrics.jsonl, sample grids, checkpoints and metrics.json; "
                    "rerunning the same command resumes it. For several processes use "
                    "`accelerate launch train/distill.py CONFIG ...`.")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys "
                   "(divergence=forward_kl steps=100 optim.lr_gen=1e-5 ratio_norm.bin_ema=0.5)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    a = p.parse_args(argv)
    return _main_of("fdistill.commands.distill", "main_from_args")(a.config, a.overrides, a.dry_run)


def _main_of(module: str, func: str = "main"):
    # Commands import their implementation (torch, diffusers, transformers) on use: `fdistill --help` and a
    # mistyped command answer at once. importlib, not an import statement, because the module is chosen by name.
    return getattr(importlib.import_module(module), func)


def _delegate(module: str, func: str = "main"):
    def run(argv: list[str]) -> int:
        return _main_of(module, func)(argv)
    return run


def _eval(argv: list[str]) -> int:
    if argv and argv[0] == "coco":  # the COCO-30k protocol lives with the text-to-image pipeline
        return _main_of("fdistill.commands.coco_eval")(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print("fdistill eval coco ...   the COCO-30k protocol for SD text-to-image (see `fdistill eval coco --help`)\n")
    return _main_of("fdistill.commands.eval")(argv)


HANDLERS = {
    "distill": _distill,
    "demo": _delegate("fdistill.commands.demo"),
    "sample": _delegate("fdistill.commands.sample"),
    "export": _delegate("fdistill.commands.export"),
    "eval": _eval,
    "convert-edm": _delegate("fdistill.commands.convert_edm"),
    "lm": _delegate("fdistill.commands.lm"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # tracebacks of known failures too, in every command
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in HANDLERS:
        close = difflib.get_close_matches(cmd, list(HANDLERS), n=1)
        print(f"fdistill: unknown command {cmd!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + "\n\n" + _help(), file=sys.stderr)
        return 2
    try:
        rc, err = call(f"fdistill {cmd}", HANDLERS[cmd], rest)
        sys.stdout.flush()  # here, so that a closed pipe is seen below rather than at exit
    except KeyboardInterrupt:  # outside training (which names its step)
        if debugging():
            raise
        print(f"fdistill {cmd}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `fdistill ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return err or int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
