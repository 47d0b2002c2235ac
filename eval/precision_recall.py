"""Improved precision/recall (k=3, Inception features): `python eval/precision_recall.py GEN REF [options]`.

Same as `fdistill eval pr`; see docs/evaluation.md.
"""
import sys

from fdistill.commands.eval import main

if __name__ == "__main__":
    sys.exit(main(["pr", *sys.argv[1:]]))
