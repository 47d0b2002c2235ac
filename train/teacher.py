"""Train the embedded MNIST teacher (a small class-conditional EDM UNet2DModel) on CPU.

    python train/teacher.py --out assets/mnist_teacher --steps 6000

Resumable: rerun the same command. The result is a diffusers UNet2DModel folder (EMA weights, safetensors)
plus fdistill_config.json with the EDM preconditioning and the training settings.
"""
import argparse
import json

from fdistill.pipelines.mnist import TEACHER_DIR, train_teacher

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(TEACHER_DIR), help="output folder (default: assets/mnist_teacher)")
    p.add_argument("--steps", type=int, default=6000, help="training steps (default 6000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate after a 10 kimg warm-up")
    p.add_argument("--ema-halflife-kimg", type=float, default=50.0)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-only", action="store_true",
                   help="only (re)compute the FID reference features and the teacher's FIDs for --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    a = p.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.eval_only:
        from fdistill.pipelines.mnist import teacher_assets

        print(json.dumps(teacher_assets(a.out), indent=1))
        raise SystemExit(0)
    meta = train_teacher(a.out, a.steps, a.batch_size, a.lr, a.ema_halflife_kimg, a.max_minutes, a.seed)
    print(json.dumps(meta, indent=1))
