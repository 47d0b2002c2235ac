"""Per-iteration cost of f-distill training: generator and critic iterations, js against reverse_kl.

    python benchmarks/step.py --config tiny                      # tiny CPU UNet (seconds)
    python benchmarks/step.py --config mnist                     # the embedded MNIST default
    python benchmarks/step.py --config imagenet64 --batch auto   # EDM's ADM at full size (GPU), random weights
    python benchmarks/step.py --config sd15 --batch auto         # SD1.5's UNet at 64x64 latents (GPU), random weights
    python benchmarks/step.py --config sdxl|sd35|flux --tiny     # the SDXL / SD3.5 / FLUX.1 tasks on tiny teachers

The task comes from the package's builders (benchmarks/tasks.py); an iteration is the trainer's own
``fdistill.iteration.TrainingIteration`` (``critic_update`` / ``generator_update``: latents, conditions and real
data drawn as in training, loss under autocast, backward, clipping, the non-finite guard, the AdamW steps, the
EMAs), on one process through accelerate as the trainer runs it, with the config's optimizers and recipe.

Measured per iteration type: wall time (median over repeats of blocks of ``--iters`` iterations, warm-up excluded,
one device sync per block; inside, the trainer's own: the non-finite guard's, one per update), images/s (generator
batch / time), peak memory (CUDA max allocated; on CPU the peak RSS sampled during the block), forward/backward calls
and rows per network (hooks, in one separate untimed iteration, plus ``Denoiser.calls`` from the timed ones), model
FLOPs (torch's FlopCounterMode) and MFU where a peak rate is known. The same is measured for ``--baseline``
(reverse_kl) in the same process, interleaved with ``--divergence`` (js) block by block so that load drifts hit
both alike: their ratio is the weighting overhead.

Output: JSON (``--out`` file, else stdout) and a one-line summary as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

_T0 = time.perf_counter()  # --deadline-s counts from here
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (PeakMemory, count_calls, count_flops, env_info, find_syncs, free, is_oom,  # noqa: E402
                     load_note, rss_mb, search_batch, summarize, sync, time_block)
from tasks import CONFIGS, backbone, build_task, n_params, networks, set_grad_ckpt  # noqa: E402

from fdistill import student  # noqa: E402
from fdistill.divergences import get_divergence  # noqa: E402
from fdistill.iteration import NonFiniteGuard, Optimizers, TrainingIteration, make_optimizers  # noqa: E402
from fdistill.objective import FDivergenceObjective  # noqa: E402
from fdistill.parallel import Parallel  # noqa: E402
from fdistill.ratio import RatioNormalizer  # noqa: E402

# Dense bf16 peak rates (vendor datasheets) for MFU; KINDS.md measured ~790 TFLOP/s for an 8k matmul on the H200.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


# ------------------------------------------------------------------------------------------------------------
# the two iterations: the trainer's TrainingIteration


class _NeverStep:
    """--count-only: no optimizer steps (their states would double the memory of a count on a small host)."""

    def ok(self, what, *norms):
        return False


class Runner:
    """The trainer's iteration on this process: one ``TrainingIteration`` per divergence, over the same networks,
    optimizers, EMAs and random stream (seeded as the trainer's first process)."""

    def __init__(self, task, cfg, divergences, device, a):
        from accelerate import Accelerator
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.task, self.cfg, self.device, self.a = task, cfg, device, a
        acc = Accelerator(mixed_precision="bf16" if a.amp == "bf16" else "no", cpu=device.type == "cpu")
        self.par = Parallel(acc)
        adamw = {"fused": True} if a.fused_adamw else ({"foreach": a.foreach} if a.foreach is not None else {})
        opts = make_optimizers(cfg.optim, task.generator, task.fake_score, task.discriminator, **adamw)
        prepared = [self.par.prepare(net, opt) for net, opt in zip(
            (task.generator, task.fake_score, task.discriminator), opts)]
        self.nets = dict(zip(("generator", "fake_score", "discriminator"), (n for n, _ in prepared)))
        self.opt = Optimizers(*(o for _, o in prepared))
        self.emas = {f"ema_{d:g}": AveragedModel(task.generator, multi_avg_fn=get_ema_multi_avg_fn(d),
                                                 use_buffers=True) for d in (cfg.ema if a.ema else [])}
        bins = task.schedule.ratio_bin_range(cfg.ratio_norm.bin_spacing)
        self.ratios = {name: RatioNormalizer(cfg.ratio_norm, bins).to(device) for name in divergences}
        self.few_step = student.attach(cfg.student, task)
        self.rng = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + 1)
        self.guard = _NeverStep() if a.count_only else NonFiniteGuard(cfg, {"gen_step": 0, "iteration": 0})
        self.per_iteration_ema = cfg.schedule.ema_every == "iteration"
        self._make_iterations(self.nets["generator"], self.nets["fake_score"])
        self.B = a.batch

    def _make_iterations(self, gen, fake):
        t, cfg = self.task, self.cfg
        self.objectives = {name: FDivergenceObjective(
            gen, t.teacher, fake, self.nets["discriminator"], get_divergence(name), r, t.schedule, cfg.objective,
            oracle_log_ratio=t.oracle_log_ratio, use_oracle_weights=cfg.ratio == "oracle", student=self.few_step)
            for name, r in self.ratios.items()}
        self.iterations = {name: TrainingIteration(cfg, t, obj, self.par, self.nets, self.opt, self.emas, self.rng,
                                                   self.guard) for name, obj in self.objectives.items()}

    @property
    def B(self) -> int:
        return self._B

    @B.setter
    def B(self, b: int):
        self._B = b
        for it in self.iterations.values():
            it.batch_size = b

    def enable_compile(self):
        """torch.compile generator and fake score, as the trainer does (after the eager counting passes: hooks
        and FlopCounterMode see the eager modules); the optimizers keep the same parameters."""
        self._make_iterations(torch.compile(self.nets["generator"]), torch.compile(self.nets["fake_score"]))
        self.B = self._B

    def _run(self, div, update):
        lim = self.a.simulate_oom_above  # lets the batch search and its fallbacks be tested off a GPU
        if lim and self.B > lim:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above batch {lim})")
        it = self.iterations[div]
        update(it)
        if self.per_iteration_ema and not self.a.count_only:  # the trainer's loop: EMAs after every iteration
            it.update_emas()
        if self.a.item_per_step:  # a host sync every iteration
            next(iter(it.logs.values()))[-1].item()

    def critic(self, div):
        self._run(div, TrainingIteration.critic_update)

    def generator_iter(self, div):
        self._run(div, TrainingIteration.generator_update)

    def phase(self, name):
        return self.generator_iter if name == "generator" else self.critic

    def clear_logs(self):
        for it in self.iterations.values():
            it.logs.clear()

    def clear(self):
        for opt in self.opt:
            opt.zero_grad(set_to_none=True)
        self.clear_logs()



# ------------------------------------------------------------------------------------------------------------
# what the divergence adds, and the speed options


def time_weighting(runner, divs, reps=200) -> dict:
    """The weighting alone (RatioNormalizer + h_f) on a batch of logits: what js adds over reverse_kl."""
    out = {}
    B, dev = runner.B, runner.device
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(B, generator=g, device=dev) * 2
    sigma = runner.task.schedule.sample_dm(B, g, dev)
    for _ in range(2):
        for name in divs:
            obj = runner.objectives[name]
            for _ in range(5):
                obj.ratio(logits, sigma, obj.divergence, update=False)
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                obj.ratio(logits, sigma, obj.divergence, update=False)
            sync(dev)
            us = (time.perf_counter() - t0) / reps * 1e6
            out[name] = min(out.get(name, float("inf")), us)
    return {k: round(v, 2) for k, v in out.items()}


def split_cfg(teacher):
    """--cfg-split: the CFG teacher's conditional and unconditional passes as two forwards (the package batches
    them into one), to measure what the batching buys."""
    orig = teacher.forward

    def forward(x_t, sigma, cond=None, mode="x0", x0_grad=True):
        w = teacher.guidance_scale
        if mode == "features" or w == 1.0:
            return orig(x_t, sigma, cond, mode, x0_grad)
        teacher.calls[mode] += 1
        c = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        out = teacher.inner(x_t, sigma, c, mode=mode, x0_grad=x0_grad)
        with torch.set_grad_enabled(x0_grad and torch.is_grad_enabled()):
            x0_u = teacher.inner(x_t, sigma, teacher.uncond(x_t.shape[0]), mode="x0")
        x0_c, feats = (out, None) if mode == "x0" else out
        guided = x0_c + (w - 1.0) * (x0_c - x0_u)
        return guided if mode == "x0" else (guided, feats)
    teacher.forward = forward


def apply_speed_options(task, a):
    if a.cfg_split:
        if not hasattr(task.teacher, "guidance_scale"):
            raise SystemExit("--cfg-split needs a CFG teacher (--config sd15)")
        split_cfg(task.teacher)
    if a.channels_last:
        for m in (task.teacher, task.generator, task.fake_score, task.discriminator):
            m.to(memory_format=torch.channels_last)
        draw = task.generator.sample_latents  # the iteration's latents in the same layout

        def sample_latents(*args, **kw):
            z = draw(*args, **kw)
            return z.contiguous(memory_format=torch.channels_last) if z.ndim == 4 else z
        task.generator.sample_latents = sample_latents


def measure(runner, task, a, divs, result, write, t_start):
    """Counting passes, warm-up and the interleaved timed blocks at batch runner.B; fills result."""
    device, B, k = runner.device, runner.B, result["settings"]["critic_per_gen"]
    # counting passes (eager): FLOPs, network calls, host-device syncs; untimed
    if a.flops:
        result["flops_per_iter"] = {ph: count_flops(runner, ph, divs[0]) for ph in ("generator", "critic")}
    one = {ph: (lambda ph=ph: runner.phase(ph)(divs[0])) for ph in ("generator", "critic")}
    result["calls_per_iter"] = {ph: count_calls(fn, task, device) for ph, fn in one.items()}
    result["host_syncs_per_iter"] = {ph: find_syncs(fn, device) for ph, fn in one.items()}
    free(runner)
    write()
    if a.count_only:
        return
    if a.compile:
        runner.enable_compile()

    # warm-up (compilation, allocator, autotuning), then interleaved timed blocks
    t_w = time.perf_counter()
    for div in divs:
        for _ in range(a.warmup):
            runner.critic(div)
            runner.generator_iter(div)
    sync(device)
    result["warmup_s"] = round(time.perf_counter() - t_w, 2)
    rss_base = rss_mb()
    times = {d: {"generator": [], "critic": []} for d in divs}
    peaks = {d: {"generator": [], "critic": []} for d in divs}
    dcalls = {d: {} for d in divs}
    mem_kind = PeakMemory(device).kind
    t_rep = time.perf_counter()
    for r in range(a.repeats):
        if r and a.deadline_s and (time.perf_counter() - t_start) + (time.perf_counter() - t_rep) / r > a.deadline_s:
            print(f"[step] deadline: stopping after {r} of {a.repeats} repeats", flush=True)
            break
        order = divs if r % 2 == 0 else divs[::-1]  # alternate who goes first
        for div in order:
            for ph in ("generator", "critic"):
                dt, pk, calls = time_block(runner, ph, div, a.iters)
                times[div][ph].append(dt)
                peaks[div][ph].append(pk)
                dcalls[div][ph] = calls
    result["settings"]["repeats_done"] = len(times[divs[0]]["generator"])
    phases = {}
    for div in divs:
        phases[div] = {}
        for ph in ("generator", "critic"):
            s = summarize(times[div][ph], peaks[div][ph], B, mem_kind)
            if device.type == "cpu":
                s["peak_mem_above_base_mb"] = round(s["peak_mem_mb"] - rss_base, 1)
            s["denoiser_calls_per_iter"] = dcalls[div][ph]
            s["calls"] = result["calls_per_iter"][ph]
            phases[div][ph] = s
        g, c = phases[div]["generator"]["time_s_median"], phases[div]["critic"]["time_s_median"]
        # one generator update of the dmd2 scheme = k critic iterations + 1 generator iteration
        phases[div]["generator_step"] = {"time_s": g + k * c, "images_per_s": B / (g + k * c),
                                         "critic_per_gen": k}
    result["phases"] = phases
    result["generator"], result["critic"] = phases[divs[0]]["generator"], phases[divs[0]]["critic"]
    if device.type == "cpu":
        result["rss_base_mb"] = round(rss_base, 1)
    result["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["_times"] = times


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, default="tiny")
    p.add_argument("--tiny", action="store_true", help="imagenet64/sd15 at toy widths (code paths on a CPU)")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--batch", default=None, help="per-iteration batch; 'auto' = largest that fits (GPU)")
    p.add_argument("--batches", default="32,64,128,256,512,768,1024",
                   help="candidates of --batch auto, ascending")
    p.add_argument("--search-seconds", type=float, default=90.0, help="time budget of --batch auto")
    p.add_argument("--divergence", default="js")
    p.add_argument("--baseline", default="reverse_kl", help="second divergence measured in the same process")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each type first")
    p.add_argument("--iters", type=int, default=5, help="iterations per timed block (one sync per block)")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per type and divergence (median)")
    p.add_argument("--amp", choices=["auto", "no", "bf16"], default="auto", help="auto: bf16 on GPU, no on CPU")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default=None,
                   help="frozen teacher weights (default: the config's)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls/convolutions for fp32 work on a GPU")
    p.add_argument("--fused-adamw", dest="fused_adamw", action="store_true", default=None,
                   help="fused AdamW (default: the config's optim.fused, on CUDA only, as the trainer)")
    p.add_argument("--no-fused-adamw", dest="fused_adamw", action="store_false")
    p.add_argument("--foreach", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile generator and fake score (as trainer)")
    p.add_argument("--grad-ckpt", choices=["config", "on", "off"], default="config",
                   help="gradient checkpointing of generator and fake score (default: the config's)")
    p.add_argument("--cfg-split", action="store_true",
                   help="sd15: CFG teacher's conditional and unconditional halves as two passes instead of one")
    p.add_argument("--item-per-step", action="store_true", help="a loss.item() (host sync) every iteration")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="skip the generator EMA update")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: bf16 datasheet of the GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip the timed repeats that would end later than this many seconds after the start "
                        "(at least one runs; the JSON says how many did)")
    p.add_argument("--count-only", action="store_true",
                   help="FLOPs and network calls only (no optimizer steps, no timing): full sizes on a small host")
    p.add_argument("--simulate-oom-above", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--simulate-oom-after-search", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default: stdout)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. objective.r1_gamma=0)")
    return p.parse_args(argv)


def resolve_args(a, cfg, device) -> None:
    """The defaults that depend on the device and the config: amp, the batch (not 'auto'), fused AdamW (the
    config's optim.fused on CUDA, as the trainer)."""
    if a.amp == "auto":
        a.amp = "bf16" if device.type == "cuda" else "no"
    a.batch = int(a.batch) if a.batch not in (None, "auto") else cfg.batch_size
    if a.fused_adamw is None:
        a.fused_adamw = bool(cfg.optim.fused) and device.type == "cuda"


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.amp == "auto":
        a.amp = "bf16" if device.type == "cuda" else "no"
    if a.tf32:  # off by default, as in the trainer (under bf16 autocast it barely matters)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(a.seed)
    result: dict = {"benchmark": "step", "config": a.config + ("-tiny" if a.tiny and a.config in (
        "imagenet64", "sd15") else ""), "complete": False, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        if argv is None else " ".join(argv), "load_start": load_note(), **env_info(device)}

    def write():
        result["load_end"] = load_note()
        text = json.dumps(result, indent=1)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out + ".tmp").write_text(text)
            os.replace(a.out + ".tmp", a.out)
        return text

    overrides = list(a.overrides)
    if a.teacher_dtype:
        overrides.append(f"task.teacher_dtype={a.teacher_dtype}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        task, cfg = build_task(a.config, a.tiny, device, Path(tmp), overrides)
    result["build_s"] = round(time.perf_counter() - t0, 2)
    grad_ckpt = cfg.gradient_checkpointing if a.grad_ckpt == "config" else a.grad_ckpt == "on"
    apply_speed_options(task, a)
    # on a CPU nothing runs out of memory (it swaps): the config's batch, unless an OOM is simulated
    auto = a.batch == "auto" and (device.type == "cuda" or a.simulate_oom_above is not None)
    resolve_args(a, cfg, device)
    divs = [a.divergence] + ([a.baseline] if a.baseline and a.baseline != a.divergence else [])
    k = max(1, cfg.schedule.critic_per_gen)
    result["settings"] = {
        "batch": a.batch, "divergences": divs, "amp": a.amp, "teacher_dtype": str(next(backbone(
            task.teacher).parameters()).dtype).replace("torch.", ""), "channels_last": a.channels_last,
        "tf32": a.tf32, "fused_adamw": a.fused_adamw, "foreach": a.foreach, "compile": a.compile,
        "grad_ckpt": grad_ckpt,
        "item_per_step": a.item_per_step, "cfg_split": a.cfg_split, "ema": list(cfg.ema) if a.ema else [],
        "critic_per_gen": k,
        "disc_features": cfg.objective.disc_features, "r1_gamma": cfg.objective.r1_gamma,
        "denoise_loss": cfg.objective.denoise_loss, "guidance_scale": getattr(task.teacher, "guidance_scale", None),
        "feature_shapes": [list(s) for s in task.info.get("feature_shapes", [])],
        "random_teacher": task.info.get("random_teacher", True), "overrides": overrides,
        "warmup": a.warmup, "iters": a.iters, "repeats": a.repeats}
    result["params"] = {n: n_params(m) for n, m in networks(task).items()}
    runner = Runner(task, cfg, divs, device, a)
    runner.grad_ckpt = grad_ckpt
    set_grad_ckpt(task, grad_ckpt)  # before the batch search: it decides what fits
    print(f"[step] {result['config']} on {result['device_name']}: built in {result['build_s']} s, params "
          f"{ {n: round(v / 1e6, 2) for n, v in result['params'].items()} } M", flush=True)

    if auto:
        cands = sorted(int(x) for x in a.batches.split(","))
        a.batch, trials = search_batch(runner, divs[0], cands, a.search_seconds)
        result["batch_search"] = trials
        result["settings"]["batch"] = a.batch
        write()
        if a.simulate_oom_after_search:  # test: the measurement then fails at the searched batch
            a.simulate_oom_above = a.simulate_oom_after_search
    cands = sorted(int(x) for x in a.batches.split(","))
    while True:
        try:
            measure(runner, task, a, divs, result, write, _T0)
            break
        except (RuntimeError, torch.OutOfMemoryError) as e:
            # the search's largest batch can still fail later (fragmentation): retry one candidate lower
            smaller = [c for c in cands if c < runner.B]
            if not (is_oom(e) and smaller):
                raise
        # outside the except block, so that the traceback's frames (and their tensors) are gone
        print(f"[step] out of memory at batch {runner.B} while measuring; retrying at {smaller[-1]}", flush=True)
        result.setdefault("oom_retries", []).append(runner.B)
        free(runner)
        runner.B = a.batch = result["settings"]["batch"] = smaller[-1]
    B = runner.B
    if a.count_only:
        result["complete"] = True
        fl = result.get("flops_per_iter") or {}
        result["summary"] = (f"[step] {result['config']} B={B}: counted only; model FLOPs per iteration "
                             + ", ".join(f"{ph} {v / 1e9:.1f} G ({v / B / 1e9:.1f} G/image)" for ph, v in fl.items()))
        text = write()
        if not a.out:
            print(text)
        print(result["summary"], flush=True)
        return result
    phases = result["phases"]
    times = result.pop("_times")
    if len(divs) == 2:
        d0, d1 = divs
        w = time_weighting(runner, divs)
        g0, g1 = phases[d0]["generator"]["time_s_median"], phases[d1]["generator"]["time_s_median"]
        c0, c1 = phases[d0]["critic"]["time_s_median"], phases[d1]["critic"]["time_s_median"]
        result["overhead"] = {
            "divergence": d0, "baseline": d1,
            "generator_time_ratio": g0 / g1,
            "critic_time_ratio": c0 / c1,  # the critic does not use the divergence: this is the noise floor
            "generator_step_time_ratio": phases[d0]["generator_step"]["time_s"] / phases[d1]["generator_step"][
                "time_s"],
            # paired per repeat: both divergences ran back to back, so the load of the moment cancels
            "generator_time_ratio_paired_median": statistics.median(
                x / y for x, y in zip(times[d0]["generator"], times[d1]["generator"])),
            # the least disturbed block of each: under CPU load the minimum is the steadiest estimate
            "generator_time_ratio_min": min(times[d0]["generator"]) / min(times[d1]["generator"]),
            "weighting_us": w,
            "weighting_fraction_of_generator_iter": (w[d0] - w[d1]) * 1e-6 / g1,
        }

    if a.flops and result.get("flops_per_iter"):
        fl = result["flops_per_iter"]
        peak = a.peak_tflops
        if peak is None and device.type == "cuda":
            peak = next((v for k_, v in PEAK_BF16_TFLOPS.items() if k_ in result["device_name"]), None)
        ach = {ph: fl[ph] / phases[divs[0]][ph]["time_s_median"] / 1e12 for ph in ("generator", "critic")
               if fl.get(ph)}
        result["achieved_tflops"] = ach
        result["peak_tflops"] = peak
        result["mfu"] = {ph: v / peak for ph, v in ach.items()} if peak and a.amp == "bf16" else None
    result["complete"] = True
    ov = result.get("overhead", {})
    mfu = result.get("mfu") or {}
    g, c = result["generator"], result["critic"]
    summary = (f"[step] {result['config']} B={B} {device.type} ({result['device_name']}): "
               f"generator {g['time_s_median'] * 1e3:.1f} ms ({g['images_per_s']:.1f} img/s, "
               f"{g['peak_mem_mb']:.0f} MB), "
               f"critic {c['time_s_median'] * 1e3:.1f} ms ({c['images_per_s']:.1f} img/s, {c['peak_mem_mb']:.0f} MB)"
               + (f"; {ov['divergence']}/{ov['baseline']} generator time x{ov['generator_time_ratio']:.3f} "
                  f"(paired x{ov['generator_time_ratio_paired_median']:.3f}, min x{ov['generator_time_ratio_min']:.3f},"
                  f" critic x{ov['critic_time_ratio']:.3f})"
                  if ov else "")
               + (f"; MFU gen {mfu['generator']:.1%} critic {mfu['critic']:.1%}" if mfu else "")
               + f"; load {result['load_start']['loadavg'][0]}/{result['load_start']['cpu_count']} cores")
    result["summary"] = summary
    text = write()
    if not a.out:
        print(text)
    print(summary, flush=True)
    return result


if __name__ == "__main__":
    main()
