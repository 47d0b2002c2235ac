"""The ``fdistill`` command."""

from __future__ import annotations

import argparse
import sys

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
    from .trainer import main_from_args

    return main_from_args(a.config, a.overrides, a.dry_run)


def _delegate(module: str, func: str = "main"):
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).__dict__[func](argv)
    return run


def _eval(argv: list[str]) -> int:
    if argv and argv[0] == "coco":  # the COCO-30k protocol lives with the text-to-image pipeline
        from .pipelines.coco_eval import main as coco_main

        return coco_main(argv[1:])
    from .metrics.cli import main as metrics_main

    if not argv or argv[0] in ("-h", "--help"):
        print("fdistill eval coco ...   the COCO-30k protocol for SD text-to-image (see `fdistill eval coco --help`)\n")
    return metrics_main(argv)


HANDLERS = {
    "distill": _distill,
    "demo": _delegate("fdistill.pipelines.mnist", "demo_main"),
    "sample": _delegate("fdistill.sampling", "main"),
    "export": _delegate("fdistill.export", "main"),
    "eval": _eval,
    "convert-edm": _delegate("fdistill.convert.edm"),
    "lm": _delegate("fdistill.lm.cli"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in HANDLERS:
        import difflib

        close = difflib.get_close_matches(cmd, list(HANDLERS), n=1)
        print(f"fdistill: unknown command {cmd!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + "\n\n" + _help(), file=sys.stderr)
        return 2
    try:
        return int(HANDLERS[cmd](rest) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from .errors import FdistillError

        if isinstance(e, (FdistillError, FileNotFoundError)) or type(e) is ValueError:
            print(f"fdistill {cmd}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
