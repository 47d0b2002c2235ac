"""Few-step students (fdistill/student.py): the stage levels, backward simulation, k-step sampling, one step
unchanged, and the k-step runs, samples and exports of the MNIST-like EDM pipeline and of Stable Diffusion.

The EDM teacher is the tiny 16x16 class-conditional UNet2DModel of tests/tiny_models.py; the SD one the tiny
pipeline of the ``sd_dir`` fixture. No downloads.
"""

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from fdistill import student  # noqa: E402
from fdistill.cli import main as cli  # noqa: E402
from fdistill.config import ConfigError, load_config  # noqa: E402
from fdistill.noise import NoiseSchedule, vp_sigmas  # noqa: E402
from fdistill.student import FewStep, StudentConfig, stage_sigmas  # noqa: E402
from tiny_models import tiny_edm_teacher  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_edm_teacher(tmp_path_factory.mktemp("few_step") / "teacher")


def _mnist_task(teacher, *overrides):
    from fdistill.pipelines import build_task

    cfg = load_config(CONFIGS / "mnist.yaml", [f"teacher={teacher}", "out=unused", "batch_size=8", *overrides])
    torch.manual_seed(cfg.seed)
    return cfg, build_task(cfg, "cpu")


def _sd_alphas():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000).alphas_cumprod


# ----------------------------------------------------------------------------------------------------------------
# stage levels


def test_default_levels_are_dmd2_timesteps_on_each_family_grid():
    vp = NoiseSchedule(vp_sigmas(_sd_alphas()), (20, 980), time="index")
    top = float(vp.sigmas[999])
    got = stage_sigmas(StudentConfig(steps=4), vp, top)
    want = [float(vp.sigmas[t]) for t in (999, 749, 499, 249)]  # DMD2's four-step SDXL timesteps
    assert got == want
    assert stage_sigmas(StudentConfig(steps=2), vp, top) == [float(vp.sigmas[t]) for t in (999, 499)]
    edm = NoiseSchedule.edm()
    got = stage_sigmas(StudentConfig(steps=4), edm, 80.0)
    assert got[0] == 80.0 and got == sorted(got, reverse=True)
    np.testing.assert_allclose(got[1:], [17.5, 2.50, 0.168], rtol=2e-3)
    # the generator's own level replaces the grid's top (an image run at noise.generator_sigma=40)
    assert stage_sigmas(StudentConfig(steps=2), edm, 40.0)[0] == 40.0
    # a flow teacher's generator starts at sigma = inf (t = 1)
    flow = NoiseSchedule(torch.linspace(0.01, 200.0, 1000), (1, 998))
    got = stage_sigmas(StudentConfig(steps=2), flow, float("inf"))
    assert got[0] == float("inf") and np.isfinite(got[1])
    # a continuous schedule: the same indices on a 1000-level Karras grid over its range
    cont = NoiseSchedule.continuous(0.002, 80.0)
    assert stage_sigmas(StudentConfig(steps=4), cont, 80.0) == pytest.approx(stage_sigmas(StudentConfig(steps=4),
                                                                                          edm, 80.0))
    # explicit levels and timesteps
    assert stage_sigmas(StudentConfig(steps=2, sigmas=[80, 1.5]), edm, 80.0) == [80.0, 1.5]
    assert stage_sigmas(StudentConfig(steps=2, timesteps=[999, 600]), vp, top) == [top, float(vp.sigmas[600])]
    assert stage_sigmas(StudentConfig(), edm, 80.0) == [80.0]


@pytest.mark.parametrize("cfg, words", [
    (StudentConfig(steps=2, sigmas=[80.0]), "2 levels"),
    (StudentConfig(steps=2, sigmas=[80.0, 90.0]), "decreasing"),
    (StudentConfig(steps=2, sigmas=[60.0, 1.0]), "generator's (80)"),
    (StudentConfig(steps=2, sigmas=[80.0, 1.0], timesteps=[999, 500]), "both set"),
    (StudentConfig(steps=2, timesteps=[999, 1000]), "grid indices"),
    (StudentConfig(steps=0), ">= 1"),
])
def test_bad_levels_are_refused_naming_the_key(cfg, words):
    with pytest.raises(ValueError, match="student") as e:
        stage_sigmas(cfg, NoiseSchedule.edm(), 80.0)
    assert words in str(e.value)


def test_config_validation_and_the_toy_generators_without_a_noise_level(tmp_path, capsys):
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(CONFIGS / "mnist.yaml", ["student.steps=4", "batch_size=2"])
    with pytest.raises(ConfigError, match="student.sigmas"):
        load_config(CONFIGS / "mnist.yaml", ["student.steps=2", "student.sigmas=[80.0]"])
    with pytest.raises(ConfigError, match="unknown config key 'student.step'"):
        load_config(CONFIGS / "mnist.yaml", ["student.step=2"])
    # the toy's default (anchors) and MLP generators have no noise-level input: refused before anything is
    # written, naming the generator that has one
    for gen in ("anchors", "mlp"):
        out = tmp_path / f"toy_{gen}"
        rc = cli(["distill", str(CONFIGS / "toy2d.yaml"), f"out={out}", "steps=1", "student.steps=2",
                  f"task.generator={gen}", "log.progress=false"])
        err = capsys.readouterr().err
        assert rc != 0 and not out.exists()
        assert "student.steps=2" in err and "task.generator=denoiser" in err and f"task.generator={gen}" in err


# ----------------------------------------------------------------------------------------------------------------
# backward simulation and the k-step sampler


class Recorder(torch.nn.Module):
    """A stand-in generator: G(x_t, c, sigma) = tanh(w x_t) + c / 10, recording every call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, x_t, cond=None, sigma=None):
        out = torch.tanh(self.w * x_t) + cond.reshape(-1, 1, 1, 1) / 10
        self.calls.append({"x_t": x_t.detach().clone(), "cond": cond.clone(), "sigma": sigma,
                           "grad": torch.is_grad_enabled(), "out": out.detach().clone()})
        return out


@pytest.mark.parametrize("k", [2, 4])
def test_backward_simulation_feeds_the_generator_its_own_renoised_output(k):
    sigmas = [80.0, 10.0, 1.0, 0.1][:k]
    fs = FewStep(sigmas, top_scale=80.0)
    gen = Recorder()
    n = 8
    z = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(0))
    cond = torch.arange(n).float()
    stages = torch.arange(n) % k
    rng = torch.Generator().manual_seed(5)
    replay = torch.Generator().manual_seed(5)
    x = fs.generate(gen, z, cond, rng, stages=stages)

    sim, graded = gen.calls[:-1], gen.calls[-1]
    assert len(sim) == k - 1 and all(not c["grad"] for c in sim)
    assert graded["grad"] and x.requires_grad
    # the simulation: stage j runs on the samples whose stage is beyond j, at level sigma_j
    x_t = z * 80.0
    for j, call in enumerate(sim):
        idx = (stages > j).nonzero().reshape(-1)
        assert call["sigma"] == sigmas[j]
        torch.testing.assert_close(call["cond"], cond[idx], rtol=0, atol=0)  # each sample keeps its condition
        torch.testing.assert_close(call["x_t"], x_t[idx], rtol=0, atol=0)
        eps = torch.randn(call["out"].shape, generator=replay)
        # the next input is this call's own output re-noised to the next level, nothing else
        x_t = x_t.clone()
        x_t[idx] = call["out"] + sigmas[j + 1] * eps
    # the graded call: every sample at its stage's level, on its own simulated input
    torch.testing.assert_close(graded["x_t"], x_t, rtol=0, atol=0)
    torch.testing.assert_close(graded["sigma"], torch.tensor(sigmas)[stages], rtol=0, atol=0)
    for j in range(1, k):  # a stage-j input is its stage-(j-1) output plus sigma_j noise: not pure noise
        assert (graded["x_t"][stages == j] - 80.0 * z[stages == j]).abs().max() > 1.0
    x.sum().backward()
    assert gen.w.grad is not None and torch.isfinite(gen.w.grad)


def test_stages_are_stratified_and_random():
    fs = FewStep([80.0, 10.0, 1.0, 0.1], 80.0)
    rng = torch.Generator().manual_seed(0)
    draws = [fs.draw_stages(10, rng, "cpu") for _ in range(20)]
    for s in draws:
        counts = torch.bincount(s, minlength=4)
        assert counts.min() >= 2 and counts.max() <= 3  # floor / ceil of 10 / 4: every stage in every batch
    assert len({tuple(s.tolist()) for s in draws}) > 10


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_step_sampling_calls_the_generator_k_times(teacher, k):
    _, task = _mnist_task(teacher, f"student.steps={k}")
    fs = student.attach(load_config(CONFIGS / "mnist.yaml", [f"student.steps={k}"]).student, task)
    assert (fs is None) == (k == 1)
    gen, den = task.generator, task.generator.denoiser
    assert len(gen.stage_sigmas) == k
    z = torch.randn(3, *SHAPE)
    y = torch.tensor([1, 2, 3])
    seen = []
    den.backbone.register_forward_pre_hook(lambda m, a: seen.append(1))
    den.reset_calls()
    with torch.no_grad():
        x = gen(z, y)
    assert den.calls["x0"] == k and len(seen) == k and x.shape == z.shape
    if k > 1:
        # the k-step sample is the sampler written out: denoise, re-noise with the given noise, denoise ...
        noise = [torch.randn(3, *SHAPE) for _ in range(k - 1)]
        with torch.no_grad():
            x = gen(z, y, noise=noise)
            x_t = z * gen.stage_sigmas[0]
            for j, s in enumerate(gen.stage_sigmas):
                ref = den(x_t, s, y)
                if j < k - 1:
                    x_t = ref + gen.stage_sigmas[j + 1] * noise[j]
        torch.testing.assert_close(x, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# one step is today's computation


def test_one_step_is_todays_loss_bit_for_bit(teacher):
    """``student.steps: 1`` (the default): the objective's x is G(z, c), one call, no random draw of its own, so
    the generator and critic losses, their logs and the random stream after them are those of the plain
    one-step objective (x = G(z, c) written out) on the same seed."""
    from fdistill.divergences import get_divergence
    from fdistill.objective import FDistill
    from fdistill.ratio import RatioNormalizer

    results = []
    for variant in ("student_steps_1", "literal"):
        cfg, task = _mnist_task(teacher, "student.steps=1")
        fs = student.attach(cfg.student, task)
        assert fs is None and task.generator.stage_sigmas == (80.0,)
        ratio = RatioNormalizer(cfg.ratio_norm, task.schedule.ratio_bin_range(cfg.ratio_norm.bin_spacing))
        obj = FDistill(task.generator, task.teacher, task.fake_score, task.discriminator,
                       get_divergence(cfg.divergence), ratio, task.schedule, cfg.objective, student=fs)
        calls = []
        gen_forward = task.generator.forward

        def spy(*a, **kw):
            calls.append((len(a), sorted(kw)))
            return gen_forward(*a, **kw)

        task.generator.forward = spy
        if variant == "literal":  # today's line: x = self.generator(z, cond)
            obj.generate = lambda z, c, rng=None: obj.generator(z, c)
        rng = torch.Generator().manual_seed(3)
        z = task.generator.sample_latents(8, rng)
        c = task.sample_cond(8, rng, "cpu")
        x_real, c_real = task.sample_real(8, rng, "cpu")
        loss_c, logs_c = obj.critic_loss(z, c, x_real, c_real, rng)
        loss_g, logs_g = obj.generator_loss(z, c, rng)
        loss_g.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in task.generator.parameters() if p.grad is not None])
        results.append((loss_c.detach(), loss_g.detach(), logs_g, grad, rng.get_state(), calls))
    a, b = results
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    assert torch.equal(a[4], b[4])  # the same random draws, in the same order
    assert a[5] == b[5] == [(2, []), (2, [])]  # G(z, c) once per loss, no noise level passed


# ----------------------------------------------------------------------------------------------------------------
# the 2-D toy: its exact denoiser made trainable (task.generator=denoiser)


def _toy_task(*overrides):
    from fdistill.pipelines import build_task

    cfg = load_config(CONFIGS / "toy2d.yaml", ["out=unused", "task.generator=denoiser", *overrides])
    torch.manual_seed(cfg.seed)
    return cfg, build_task(cfg, "cpu")


def test_toy_denoiser_generator_starts_as_the_teacher():
    cfg, task = _toy_task()
    gen, den, teacher = task.generator, task.generator.denoiser, task.teacher
    assert gen.generator_sigma == cfg.task["sigma_max"] == 8.0 and gen.latent_shape == (2,)
    assert den.prior_scale(8.0) == 8.0  # variance exploding: x_t = x + sigma eps
    trainable = [p for p in gen.parameters() if p.requires_grad]
    assert trainable and all(p.requires_grad for p in den.residual.parameters())
    rng = torch.Generator().manual_seed(0)
    x_t = 6 * torch.randn(64, 2, generator=rng)
    sigma = torch.exp(torch.empty(64).uniform_(math.log(0.05), math.log(8.0), generator=rng))
    with torch.no_grad():
        for s in (8.0, 1.0, 0.05, sigma):  # the residual is zero: the teacher's x0, the same computation
            torch.testing.assert_close(den(x_t, s), teacher(x_t, s), rtol=0, atol=0)
        z = torch.randn(64, 2, generator=rng)
        torch.testing.assert_close(gen(z), teacher(8.0 * z, 8.0), rtol=0, atol=0)  # one step: D(8 z, 8)
        # the residual is live: moving its last layer moves the output, scaled by EDM's c_out
        den.residual.out[1].bias.fill_(1.0)
        diff = den(x_t, 8.0) - teacher(x_t, 8.0)
    torch.testing.assert_close(diff, torch.full_like(diff, 8.0 * 4.0 / math.sqrt(8.0 ** 2 + 4.0 ** 2)))


def test_toy_two_step_sampling_calls_the_denoiser_twice():
    cfg, task = _toy_task("student.steps=2")
    fs = student.attach(cfg.student, task)
    gen, den = task.generator, task.generator.denoiser
    assert fs is not None and fs.steps == 2 and gen.stage_sigmas[0] == 8.0 and 0.05 < gen.stage_sigmas[1] < 8.0
    seen = []
    den.residual.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    den.reset_calls()
    z = gen.sample_latents(5, torch.Generator().manual_seed(1))
    noise = [torch.randn(5, 2, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        x = gen(z, noise=noise)
        assert den.calls["x0"] == 2 and seen == [5, 5] and x.shape == (5, 2)
        # the sampler written out: D at sigma_0 on sigma_0 z, re-noised to sigma_1 with the given noise, D again
        ref = task.teacher(task.teacher(8.0 * z, 8.0) + gen.stage_sigmas[1] * noise[0], gen.stage_sigmas[1])
    torch.testing.assert_close(x, ref, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_toy_denoiser_generator_distills_end_to_end(tmp_path, k):
    """`fdistill distill configs/toy2d.yaml task.generator=denoiser student.steps=k` for a few steps."""
    out = tmp_path / f"toy_{k}step"
    rc = cli(["distill", str(CONFIGS / "toy2d.yaml"), f"out={out}", "task.generator=denoiser",
              f"student.steps={k}", "steps=3", "batch_size=16", "task.eval_samples=500", "task.kde_samples=256",
              "log.progress=false"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["gen_steps"] == 3 and m["nfe_student"] == k and m["eval_samples"] == 500
    assert 0.0 <= m["off_mode_fraction"] <= 1.0 and 0.0 <= m["mode_coverage"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for v in rows[-1].values() if isinstance(v, float))


# ----------------------------------------------------------------------------------------------------------------
# runs, sampling and export: the MNIST-like EDM pipeline


@pytest.fixture(scope="module")
def two_step_run(teacher, tmp_path_factory):
    """`fdistill distill configs/mnist.yaml student.steps=2` on the tiny teacher: 2 generator steps."""
    out = tmp_path_factory.mktemp("runs") / "mnist_2step"
    rc = cli(["distill", str(CONFIGS / "mnist.yaml"), f"teacher={teacher}", f"out={out}", "student.steps=2",
              "steps=2", "batch_size=4", "ema=[0.9]", "task.eval_samples=0", "task.grid_samples=4",
              "log.progress=false"])
    assert rc == 0
    return out


def test_two_step_mnist_run_records_its_levels(two_step_run):
    meta = json.loads((two_step_run / "ckpt-00000002" / "meta.json").read_text())
    assert meta["config"]["student"]["steps"] == 2
    sig = meta["student_sigmas"]
    assert len(sig) == 2 and sig[0] == 80.0 and 2.0 < sig[1] < 3.0  # EDM grid index 499: sigma 2.5
    rows = [json.loads(line) for line in (two_step_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(np.isfinite(v) for v in rows[-1].values() if isinstance(v, float))
    assert json.loads((two_step_run / "metrics.json").read_text())["nfe_student"] == 2


def test_two_step_export_loads_in_diffusers_and_samples_in_two_evaluations(two_step_run, tmp_path):
    from fdistill.export import pipeline_from_checkpoint
    from fdistill.onestep import OneStepPipeline

    out = tmp_path / "export"
    assert cli(["export", str(two_step_run), str(out)]) == 0
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    meta = json.loads((out / "fdistill_export.json").read_text())
    assert len(sched["sigmas"]) == 2 and sched["sigmas"][0] == sched["sigma_max"] == 80.0
    assert meta["num_steps"] == 2 and "2-step" in (out / "README.md").read_text()

    pipe = OneStepPipeline.from_pretrained(str(out))  # diffusers' loader (DiffusionPipeline.from_pretrained)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "OneStepPipeline" and pipe.num_steps == 2
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    seeds, labels = [3, 7, 11], [0, 5, 9]
    x = pipe(class_labels=labels, seeds=seeds, output_type="raw").images
    assert calls == [3, 3]  # two network evaluations of the whole batch

    # `fdistill sample` on the checkpoint gives the same images
    samples = tmp_path / "samples"
    assert cli(["sample", str(two_step_run), "--seeds", "3,7,11", "--labels", "0,5,9", "--outdir",
                str(samples), "--batch", "2"]) == 0
    from PIL import Image

    from fdistill.imageio import to_uint8
    ours = np.stack([np.asarray(Image.open(samples / f"{s:06d}.png")) for s in seeds])
    np.testing.assert_array_equal(to_uint8(x).numpy()[..., 0], ours.reshape(3, 16, 16))

    # the second evaluation matters: the same UNet in one step gives other images
    one = pipeline_from_checkpoint(two_step_run)
    one.scheduler.register_to_config(sigmas=None)
    x1 = one(class_labels=labels, seeds=seeds, output_type="raw").images
    assert (x1 - x).abs().max() > 1e-3
    # the same seed gives the same image whatever the batch
    x_alone = pipe(class_labels=[5], seeds=[7], output_type="raw").images
    torch.testing.assert_close(x_alone[0], x[1], rtol=1e-5, atol=1e-5)


def test_demo_student_steps(tmp_path, monkeypatch):
    """`fdistill demo --student-steps 2` (one generator step, no FID: the flag reaches the run)."""
    out = tmp_path / "demo"
    rc = cli(["demo", "--student-steps", "2", "--steps", "1", "--out", str(out), "batch_size=4",
              "task.eval_samples=0", "task.grid_samples=4", "log.progress=false"])
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["nfe_student"] == 2
    assert json.loads((out / "config.json").read_text())["student"]["steps"] == 2


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion: re-noising in VP space, the LCMScheduler export


def test_sd_few_step_export_is_our_sampler_in_a_stock_pipeline(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from fdistill.denoisers_vp import VPUNetDenoiser
    from fdistill.export_sd import export_sd_pipeline
    from fdistill.generator import OneStepGenerator
    from fdistill.pipelines import coco_t2i
    from fdistill.student import per_image_renoise

    unet, sched, vae, te, tok = coco_t2i.load_teacher_parts(str(sd_dir))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    den = VPUNetDenoiser(unet, sched.alphas_cumprod, "epsilon")
    schedule = NoiseSchedule(den.sigmas, (20, 980), generator_sigma=float(den.sigmas[999]), time="index")
    for k, ts in ((2, [999, 499]), (4, [999, 749, 499, 249])):
        sig = stage_sigmas(StudentConfig(steps=k), schedule, schedule.generator_sigma)
        gen = OneStepGenerator(den, sig[0], (4, 8, 8))
        gen.set_stages(sig)
        out = export_sd_pipeline(gen, str(sd_dir), tmp_path / f"export{k}", timesteps=ts)
        meta = json.loads((out / "fdistill_export.json").read_text())
        assert meta["num_inference_steps"] == k and meta["timesteps"] == ts
        pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.scheduler).__name__ == "LCMScheduler"
        calls = []
        pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(int(a[1].reshape(-1)[0])))
        seeds = [0, 1]
        z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
        gens = [torch.Generator().manual_seed(s + student.RENOISE_SEED_OFFSET) for s in seeds]
        prompts = ["a red bus", "a cat"]
        theirs = pipe(prompts, num_inference_steps=k, guidance_scale=1.0, latents=z, generator=gens,
                      output_type="latent").images
        assert calls == ts  # k UNet evaluations at the student's timesteps
        cond = {"encoder_hidden_states": coco_t2i.encode_prompts(tok, te, prompts)}
        with torch.no_grad():
            ours = gen(z, cond, noise=per_image_renoise(seeds, (4, 8, 8), k))
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_sd_two_step_distill_export_and_sample(sd_dir, tmp_path):
    from fdistill.export_sd import export_from_checkpoint

    root = tmp_path
    (root / "prompts.txt").write_text("a red bus\na cat on a sofa\n")
    imgs = root / "imgs"
    imgs.mkdir()
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    run = root / "run"
    rc = cli(["distill", str(CONFIGS / "coco_sd15_js.yaml"), f"teacher={sd_dir}", f"prompts={root / 'prompts.txt'}",
              f"data={imgs}", "steps=1", "batch_size=2", f"out={run}", "log.progress=false", "student.steps=2"])
    assert rc == 0
    meta = json.loads((run / "ckpt-00000001" / "meta.json").read_text())
    assert len(meta["student_sigmas"]) == 2
    out = export_from_checkpoint(run, root / "export")
    assert json.loads((out / "fdistill_export.json").read_text())["timesteps"] == [999, 499]
    samples_ckpt, samples_exp = root / "s1", root / "s2"
    (root / "p.txt").write_text("a red bus\n")
    for src, dst in ((run, samples_ckpt), (out, samples_exp)):
        assert cli(["sample", str(src), "--seeds", "0,1", "--prompts", str(root / "p.txt"), "--outdir",
                    str(dst)]) == 0
    a = [np.asarray(Image.open(p)) for p in sorted(samples_ckpt.glob("*.png"))]
    b = [np.asarray(Image.open(p)) for p in sorted(samples_exp.glob("*.png"))]
    assert len(a) == 2 and all(np.array_equal(u, v) for u, v in zip(a, b))
    # `fdistill eval coco`'s generation of the export: its two steps, the same per-image noise
    from fdistill.pipelines.coco_eval import generate
    rec = [json.loads(line) for line in (samples_exp / "index.jsonl").read_text().splitlines()]
    assert generate(str(out), [r["prompt"] for r in rec], root / "coco", steps=2, progress=False) == 2
    c = [np.asarray(Image.open(p)) for p in sorted((root / "coco").glob("*.png"))]
    assert all(np.array_equal(u, v) for u, v in zip(b, c))


# ----------------------------------------------------------------------------------------------------------------
# the new teacher families: SDXL (VP, LCMScheduler) and SD3 / FLUX.1 (flow, stochastic Euler at the student's t)

FAMILY_CONFIGS = {"sdxl": "sdxl_js.yaml", "sd3": "sd35_medium_js.yaml", "flux": "flux_dev_js.yaml"}
FAMILY_TINY = ["task.teacher_dtype=float32", "task.resolution=32", "task.max_sequence_length=16",
               "task.eval_prompts=2", "gradient_checkpointing=false", "log.progress=false", "steps=1", "batch_size=2",
               "student.steps=2"]


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_family_two_step_export_is_our_sampler_and_fdistill_sample(family, tmp_path):
    import tiny_teachers
    from diffusers import DiffusionPipeline
    from PIL import Image
    from safetensors.torch import load_file

    from fdistill.denoisers_flow import pack_latents, unpack_latents
    from fdistill.pipelines import build_task
    from fdistill.pipelines.diffusers_t2i import encode_texts
    from fdistill.sampler import per_image_latents
    from fdistill.student import RENOISE_SEED_OFFSET

    teacher = {"sdxl": tiny_teachers.tiny_sdxl, "sd3": tiny_teachers.tiny_sd3,
               "flux": tiny_teachers.tiny_flux}[family](tmp_path / "teacher")
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    prompts = ["a red bus on a street", "two dogs playing in the snow"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    args = [str(CONFIGS / FAMILY_CONFIGS[family]), f"teacher={teacher}", f"prompts={tmp_path / 'p.txt'}",
            f"data={tmp_path / 'images'}", *FAMILY_TINY]
    run = tmp_path / "run"
    assert cli(["distill", *args, f"out={run}"]) == 0
    sig = json.loads((run / "ckpt-00000001" / "meta.json").read_text())["student_sigmas"]
    assert len(sig) == 2 and (sig[0] == float("inf")) == (family != "sdxl")
    out = tmp_path / "export"
    assert cli(["export", str(run), str(out)]) == 0
    meta = json.loads((out / "fdistill_export.json").read_text())
    assert meta["num_inference_steps"] == 2
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    net = pipe.unet if family == "sdxl" else pipe.transformer
    calls = []
    net.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)

    cfg = load_config(args[0], args[1:] + [f"out={tmp_path / 'probe'}"])
    task = build_task(cfg, "cpu")
    student.attach(cfg.student, task)
    task.generator.load_state_dict(load_file(str(run / "ckpt-00000001" / "generator.safetensors")))
    seeds = [3, 7]
    shape = task.generator.latent_shape
    z = per_image_latents(seeds, shape)
    gens = [torch.Generator().manual_seed(s + RENOISE_SEED_OFFSET) for s in seeds]
    msl = {} if family == "sdxl" else {"max_sequence_length": 16}
    latents = pack_latents(z) if family == "flux" else z
    kw = dict(guidance_scale=meta["guidance_scale"], height=32, width=32, output_type="latent",
              **meta["call_kwargs"], **msl)
    with torch.no_grad():
        if family == "sdxl":
            theirs = pipe(prompts, latents=latents, generator=gens, **kw).images
            assert len(calls) == 2  # two network evaluations
        else:  # SD3 / Flux pipelines re-noise from torch's global stream: one image per call, seeded
            theirs = []
            for i, s in enumerate(seeds):
                torch.manual_seed(s + RENOISE_SEED_OFFSET)
                theirs.append(pipe(prompts[i:i + 1], latents=latents[i:i + 1], **kw).images)
            theirs = torch.cat(theirs)
            assert len(calls) == 4  # two network evaluations per image
        cond = encode_texts(pipe, family, prompts, 16)
        if family == "sdxl":
            cond["time_ids"] = torch.tensor([[32.0, 32.0, 0, 0, 32.0, 32.0]]).expand(2, 6)
        # the same per-image noise, in the layout the pipeline draws it (Flux: packed tokens)
        g2 = [torch.Generator().manual_seed(s + RENOISE_SEED_OFFSET) for s in seeds]
        if family == "flux":
            noise = [unpack_latents(torch.stack([torch.randn(latents.shape[1:], generator=g) for g in g2]),
                                    shape[1], shape[2])]
        else:
            noise = [torch.stack([torch.randn(shape, generator=g) for g in g2])]
        ours = task.generator(z, cond, noise=noise)
    if family == "flux":
        theirs = unpack_latents(theirs, shape[1], shape[2])
    torch.testing.assert_close(theirs.float(), ours, rtol=1e-4, atol=1e-4)

    for src, name in ((run, "a"), (out, "b")):
        assert cli(["sample", str(src), "--prompts", str(tmp_path / "p.txt"), "--seeds", "3,7", "--outdir",
                    str(tmp_path / name), "--quiet"]) == 0
    a = [np.asarray(Image.open(tmp_path / "a" / f"{s:06d}.png")) for s in seeds]
    b = [np.asarray(Image.open(tmp_path / "b" / f"{s:06d}.png")) for s in seeds]
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------
# several processes: the simulation runs through the DDP / FSDP wrappers


def _launch_two(out, teacher, fsdp: bool):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    mode = ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sync_module_states", "false",
            "--fsdp_cpu_ram_efficient_loading", "false", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", "ResnetBlock2D,Attention"] if fsdp else ["--multi_gpu"]
    script = "tests/fsdp_cpu_distill.py" if fsdp else "tests/distill_hooks.py"
    cmd = [accelerate, "launch", *mode, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(root / script), str(CONFIGS / "mnist.yaml"), f"out={out}",
           f"teacher={teacher}", "steps=2", "batch_size=2", "student.steps=2", "optim.grad_clip=0",
           "task.eval_samples=0", "task.grid_samples=4", "log.every=1", "log.progress=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DISTILL_DUMP_RANKS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=900)


def test_two_step_student_on_two_processes_ddp_equals_fsdp(teacher, tmp_path):
    """Two processes, one sample per stage on each: DDP keeps the ranks identical, and FSDP1 (whose forward
    passes are collective, so every process must run the same simulation passes) trains as DDP (to rounding)."""
    from safetensors.torch import load_file

    runs = {}
    for name, fsdp in (("ddp", False), ("fsdp1", True)):
        runs[name] = tmp_path / name
        r = _launch_two(runs[name], teacher, fsdp)
        assert r.returncode == 0, r.stderr[-4000:]
    for f in ("rank0_generator", "rank1_generator", "ckpt-00000002/generator", "ckpt-00000002/fake_score"):
        x, y = (load_file(str(runs[name] / f"{f}.safetensors")) for name in ("ddp", "fsdp1"))
        assert x.keys() == y.keys()
        for k in x:  # DDP and FSDP reduce and step over differently laid-out tensors: equal up to rounding
            torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6, msg=f"{f} {k}")
    a, b = (load_file(str(runs["ddp"] / f"rank{i}_generator.safetensors")) for i in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((runs["fsdp1"] / "ckpt-00000002" / "meta.json").read_text())["student_sigmas"][0] == 80.0
