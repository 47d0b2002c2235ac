"""Generate images with a distilled generator: `python eval/sample.py SOURCE --num N [options]`.

Same as `fdistill sample` (SOURCE: a run directory, a ckpt-<step> folder or an exported pipeline folder). For the
ImageNet-64 protocol (docs/evaluation.md): `python eval/sample.py runs/imagenet64_js --seeds 0-49999 --npz samples.npz`.
"""
import sys

from fdistill.commands.sample import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
