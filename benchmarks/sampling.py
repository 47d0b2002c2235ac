"""Sampling speed: the one-step student against the teacher's EDM sampler, in the same process.

    python benchmarks/sampling.py --config tiny
    python benchmarks/sampling.py --config mnist                       # teacher: 18 Heun steps = 35 NFE
    python benchmarks/sampling.py --config imagenet64 --batch 256      # GPU; teacher: 40 steps = 79 NFE (EDM's)

The networks are those of benchmarks/step.py (benchmarks/tasks.py's builders, random weights unless the config ships a teacher):
the student is the OneStepGenerator (one network evaluation), the teacher runs ``fdistill.sampler.edm_sample``
(Heun, 2 * steps - 1 evaluations, counted with ``Denoiser.calls``). Both run under no_grad with the same batch,
latents and conditions, bf16 autocast on a GPU; blocks alternate student / teacher, medians over repeats after a
warm-up. For sd15 an evaluation is one batched conditional + unconditional pass of the CFG teacher, and the
"EDM sampler" runs over the teacher's VP sigma range.

Output: JSON (``--out`` file, else stdout) and a one-line summary as the last line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import measure  # noqa: E402  (benchmarks/measure.py: memory probe, environment)
import tasks  # noqa: E402  (benchmarks/tasks.py: the benchmarks' task builders)

T0 = time.perf_counter()  # --deadline-s counts from here
TEACHER_STEPS = {"tiny": 18, "mnist": 18, "imagenet64": 40, "sd15": 25}
DEFAULT_BATCH = {"tiny": 8, "mnist": 100, "imagenet64": 64, "sd15": 16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=tasks.CONFIGS, default="tiny")
    p.add_argument("--tiny", action="store_true", help="imagenet64/sd15 at toy widths (code paths on a CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="teacher Heun steps (NFE = 2 steps - 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--student-iters", type=int, default=None,
                   help="one-step batches per timed block (default: the teacher's NFE, so blocks are comparable)")
    p.add_argument("--amp", choices=["auto", "no", "bf16"], default="auto")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls/convolutions for fp32 work on a GPU")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip repeats that would end later than this many seconds after the start (at least one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from fdistill.sampler import edm_nfe, edm_sample, one_step_sample

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = a.amp if a.amp != "auto" else ("bf16" if device.type == "cuda" else "no")
    if a.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(a.seed)
    B = a.batch or DEFAULT_BATCH[a.config]
    steps = a.steps or TEACHER_STEPS[a.config]
    res = {"benchmark": "sampling", "config": a.config + ("-tiny" if a.tiny and a.config in ("imagenet64", "sd15")
                                                          else ""),
           "command": " ".join(["sampling.py", *(sys.argv[1:] if argv is None else argv)]),
           "load_start": measure.load_note(), **measure.env_info(device)}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        task, _cfg = tasks.build_task(a.config, a.tiny, device, Path(tmp), a.overrides)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    gen, teacher = task.generator.eval(), task.teacher
    del task.fake_score, task.discriminator  # not needed here
    if a.channels_last:
        for m in (gen, teacher):
            m.to(memory_format=torch.channels_last)
    sched = task.schedule
    rng = torch.Generator(device=device).manual_seed(a.seed)
    z = gen.sample_latents(B, rng, device)
    cond = task.sample_cond(B, rng, device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    nfe = edm_nfe(steps)
    student_iters = a.student_iters or nfe

    def student():
        with ctx:
            for _ in range(student_iters):
                one_step_sample(gen, z, cond)

    def teacher_run():
        with ctx:
            edm_sample(teacher, z, cond, steps, sigma_min=sched.sigma_min, sigma_max=sched.sigma_max)

    def timed(fn, n_images):
        with measure.PeakMemory(device) as pm:
            measure.sync(device)
            t = time.perf_counter()
            fn()
            measure.sync(device)
            dt = time.perf_counter() - t
        return dt / n_images, pm.peak_bytes

    teacher.reset_calls()
    with torch.no_grad():
        teacher_run()  # warm-up, and the NFE count
    counted = dict(teacher.calls)
    with torch.no_grad():
        for _ in range(a.warmup):
            student()
        for _ in range(a.warmup - 1):
            teacher_run()
        per_img = {"student": [], "teacher": []}
        peaks = {"student": [], "teacher": []}
        t_rep = time.perf_counter()
        for r in range(a.repeats):
            if r and a.deadline_s and (time.perf_counter() - T0) + (time.perf_counter() - t_rep) / r > a.deadline_s:
                print(f"[sampling] deadline: stopping after {r} of {a.repeats} repeats", flush=True)
                break
            for name in (("student", "teacher") if r % 2 == 0 else ("teacher", "student")):
                if name == "student":
                    s, pk = timed(student, B * student_iters)
                else:
                    s, pk = timed(teacher_run, B)
                per_img[name].append(s)
                peaks[name].append(pk)
    out = {}
    for name, n in (("student", 1), ("teacher", nfe)):
        med = statistics.median(per_img[name])
        out[name] = {"nfe": n, "seconds_per_image_median": med, "seconds_per_image_all": per_img[name],
                     "images_per_s": 1 / med, "peak_mem_mb": round(max(peaks[name]) / 2 ** 20, 1),
                     "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss"}
    out["teacher"].update(num_steps=steps, calls_counted=counted)
    res.update(settings={"batch": B, "amp": amp, "channels_last": a.channels_last, "tf32": a.tf32,
                         "teacher_steps": steps,
                         "student_iters_per_block": student_iters, "warmup": a.warmup, "repeats": a.repeats,
                         "repeats_done": len(per_img["student"]),
                         "teacher_dtype": str(next(tasks.backbone(teacher).parameters()).dtype).replace(
                             "torch.", "")},
               student=out["student"], teacher=out["teacher"],
               speedup=out["student"]["images_per_s"] / out["teacher"]["images_per_s"], nfe_ratio=nfe,
               load_end=measure.load_note())
    st, te = out["student"], out["teacher"]
    res["summary"] = (f"[sampling] {res['config']} B={B} {device.type} ({res['device_name']}): student "
                      f"{st['images_per_s']:.1f} img/s (1 NFE), teacher {te['images_per_s']:.2f} img/s ({nfe} NFE): "
                      f"x{res['speedup']:.1f} faster; load {res['load_start']['loadavg'][0]}/"
                      f"{res['load_start']['cpu_count']} cores")
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out + ".tmp").write_text(text)
        os.replace(a.out + ".tmp", a.out)
    else:
        print(text)
    print(res["summary"], flush=True)
    return res


if __name__ == "__main__":
    main()
