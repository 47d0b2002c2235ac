"""``fdistill lm``: f-divergence alignment of causal LMs.

    fdistill lm dpo   [CONFIG.yaml] [key=value ...]   f-DPO on {prompt, chosen, rejected} pairs (reverse_kl = DPO)
    fdistill lm tdpo  [CONFIG.yaml] [key=value ...]   TDPO1 / TDPO2 on the same pairs
    fdistill lm fdpg  [CONFIG.yaml] [key=value ...]   f-DPG toward an energy-based target a(x) b(x) or a(x) e^{r/beta}
    fdistill lm dph   [CONFIG.yaml] [key=value ...]   DPH-RL: GRPO + a divergence on near-perfect prompts
    fdistill lm demo  [CONFIG.yaml] [key=value ...]   the toy digit-sum language, every method, one table

Also runnable as ``python -m fdistill.commands.lm ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fdistill.lm.config import CONFIGS, ConfigError, describe, dump_yaml, load_config
from fdistill.lm.demo import run_demo
from fdistill.lm.trainers import TRAINERS

from . import USER_ERRORS, call

DESCRIPTIONS = {
    "dpo": "f-DPO (Wang et al. 2023, arXiv 2309.16240): DPO with the reverse-KL constraint replaced by any "
           "f-divergence; divergence=reverse_kl is DPO. Data: a JSONL of {prompt, chosen, rejected} "
           "(data=toy writes toy-language pairs).",
    "tdpo": "TDPO (Zeng et al. 2024, arXiv 2404.11999): DPO with a token-level sequential KL(pi_ref || pi) "
            "margin, variant 1 or 2 (recommended). Same data as dpo; the reference runs online (full logits).",
    "fdpg": "f-DPG (Go et al. 2023, arXiv 2302.08215): minimise D_f(pi || p) for an energy-based target "
            "p ~ a(x) b(x) (target=gdc, b = scorer >= 0) or a(x) exp(r(x)/beta) (target=rlhf, r = scorer), "
            "a = the reference model; REINFORCE with pseudo-reward -f'(pi/p), moving-average baseline, "
            "importance-sampled log Z per prompt.",
    "dph": "DPH-RL (Li et al. 2025, arXiv 2509.07430): pre-sample the initial policy once; prompts whose samples "
           "are all correct are near-perfect (their samples and reference log-probs are stored), the rest are "
           "exploration prompts trained with GRPO (PPO-clip, no KL); + eta * D_f(pi || pi_ref) on the stored "
           "samples via the generator (forward_kl as k3, js, alpha:a). divergence=none is plain GRPO.",
    "demo": "Pretrain a tiny GPT-2 on the toy digit-sum language (CPU, about a minute), align it with f-DPO, "
            "TDPO, f-DPG and DPH-RL under several divergences, and print reward against diversity (distinct "
            "correct answers, entropy, pass@k) as a table. A few minutes on 2 CPU cores.",
}


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    config, overrides = None, []
    for it in items:
        if "=" not in it and (it.endswith((".yaml", ".yml")) or Path(it).is_file()):
            if config is not None:
                raise ConfigError(f"two config files given: {config} and {it}")
            config = it
        elif "=" in it:
            overrides.append(it)
        else:
            raise ConfigError(f"{it!r} is neither a config file (.yaml) nor a key=value override")
    return config, overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdistill lm", description="f-divergence alignment of causal language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every command takes an optional YAML config (configs/lm/*.yaml) and key=value overrides;\n"
               "`fdistill lm <command> --help` lists the keys.")
    sub = parser.add_subparsers(dest="command", metavar="{dpo,tdpo,fdpg,dph,demo}")
    for name, cls in CONFIGS.items():
        p = sub.add_parser(name, help=DESCRIPTIONS[name].split(":")[0].split(" (")[0],
                           description=DESCRIPTIONS[name], formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"config keys (YAML or key=value):\n{describe(cls)}\n\n"
                                  f"example: fdistill lm {name} configs/lm/{name}.yaml seed=1")
        p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                       help="an optional YAML config, then key=value overrides (values parsed as YAML)")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error
        return int(e.code or 0)
    if ns.command is None:
        parser.print_help()
        return 2
    cls = CONFIGS[ns.command]
    prog = f"fdistill lm {ns.command}"
    cfg, rc = call(prog, lambda: load_config(cls, *_split_args(ns.args)))
    if rc:
        return rc
    if ns.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the per-load progress bars drown the training log
    except ImportError:
        pass
    run = run_demo if ns.command == "demo" else TRAINERS[ns.command]
    # a known failure while training (a data file, a diverged run) exits 2 like every other command;
    # KeyError: a column missing from a data file
    result, rc = call(prog, run, cfg, errors=(*USER_ERRORS, KeyError))
    if rc:
        return rc
    if ns.command != "demo":
        print(f"final checkpoint: {result['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
