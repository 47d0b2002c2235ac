"""Distill with accelerate on one or many processes:

    accelerate launch [--num_processes N] train/distill.py CONFIG [key=value ...]

The same as `fdistill distill CONFIG ...`; the logic lives in fdistill.commands.distill (which builds the task) and fdistill.trainer.
"""
import sys

from fdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
