"""CLIP score: `python eval/clip_score.py IMAGES --captions FILE --pretrained CKPT [options]`.

Same as `fdistill eval clip`; see docs/evaluation.md for the COCO-30k protocol.
"""
import sys

from fdistill.commands.eval import main

if __name__ == "__main__":
    sys.exit(main(["clip", *sys.argv[1:]]))
