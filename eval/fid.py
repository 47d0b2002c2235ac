"""FID of generated images against a reference: `python eval/fid.py GEN REF [options]`.

Same as `fdistill eval fid`; also `python eval/fid.py ref DATA --out stats.npz` for reference statistics.
See docs/evaluation.md for the papers' protocols.
"""
import sys

from fdistill.commands.eval import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv if argv[:1] == ["ref"] else ["fid", *argv]))
