"""The sdxl / sd3 / flux tasks end to end on tiny random-weight teachers (tests/tiny_teachers.py), and LoRA students.

For each family: `fdistill distill configs/<family>.yaml` runs 2 generator steps on CPU from a local teacher folder;
`fdistill export` writes the family's own diffusers pipeline; DiffusionPipeline.from_pretrained of it samples in
one step exactly the generator's images (and `fdistill sample`'s). LoRA: adapters disabled is the teacher bit for
bit, only the adapters train, export merges them and writes them alone for `load_lora_weights`.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

import tiny_teachers  # noqa: E402  (tests/ is on sys.path)
from fdistill.config import load_config  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = {"sdxl": "configs/sdxl_js.yaml", "sd3": "configs/sd35_medium_js.yaml", "flux": "configs/flux_dev_js.yaml"}
BUILDERS = {"sdxl": tiny_teachers.tiny_sdxl, "sd3": tiny_teachers.tiny_sd3, "flux": tiny_teachers.tiny_flux}
PROMPTS = ["a red bus on a street", "two dogs playing in the snow", "a plate of food", "a man riding a horse"]
TINY = ["task.teacher_dtype=float32", "task.resolution=32", "task.max_sequence_length=16", "task.eval_prompts=2",
        "gradient_checkpointing=false", "log.progress=false", "steps=2", "batch_size=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return {f: BUILDERS[f](tmp_path_factory.mktemp(f)) for f in BUILDERS}


def _args(family, teacher, data_dir, out, *extra):
    return [os.path.join(ROOT, CONFIGS[family]), f"teacher={teacher}", f"prompts={data_dir / 'prompts.txt'}",
            f"data={data_dir / 'images'}", f"out={out}", *TINY, *extra]


def _cfg(family, teacher, data_dir, out, *extra):
    a = _args(family, teacher, data_dir, out, *extra)
    return load_config(a[0], a[1:])


def test_configs_name_hub_ids_and_their_family():
    for family, path in CONFIGS.items():
        cfg = load_config(os.path.join(ROOT, path))
        assert cfg.pipeline == family and "/" in cfg.teacher and not os.path.exists(cfg.teacher)
        assert cfg.noise.grid == ("vp" if family == "sdxl" else "flow")


# The published recipes each config cites: NVlabs/FastGen fastgen/configs/experiments/SDXL/config_f_distill.py and
# Flux/config_dmd2.py (student_update_freq: fastgen/configs/methods/config_dmd2.py's default, which both keep),
# DMD2's one-step SDXL script (tianweiy/DMD2 experiments/sdxl/), the SD3.5 Medium model card (guidance 4.5).
RECIPES = {
    "sdxl": {"optim.lr_gen": 5e-7, "objective.gan_weight": 5e-3, "objective.fake_trunk_gan_weight": 1e-2,
             "task.guidance_scale": 8.0, "schedule.critic_per_gen": 5, "optim.grad_clip": 10.0,
             "objective.r1_gamma": 0.0},
    "sd3": {"optim.lr_gen": 1e-5, "objective.gan_weight": 3e-2, "task.guidance_scale": 4.5, "task.resolution": 512,
            "schedule.critic_per_gen": 5, "batch_size": 2, "task.teacher_dtype": "bfloat16"},
    "flux": {"optim.lr_gen": 1e-5, "objective.gan_weight": 3e-2, "task.guidance_scale": 3.5, "task.resolution": 512,
             "schedule.critic_per_gen": 5, "batch_size": 2, "task.teacher_dtype": "bfloat16"},
}


@pytest.mark.parametrize("family", list(RECIPES))
def test_configs_carry_the_recipe_values_they_cite(family):
    cfg = load_config(os.path.join(ROOT, CONFIGS[family]))
    for key, want in RECIPES[family].items():
        obj = cfg
        for part in key.split("."):
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        assert obj == want, (key, obj, want)
    assert cfg.optim.lr_critic in (None, cfg.optim.lr_gen)  # one learning rate for all networks
    assert cfg.schedule.scheme == "dmd2" and cfg.divergence == "js"


@pytest.mark.parametrize("family,extra", [("sdxl", ()), ("sd3", ()), ("flux", ("task.lora_rank=4",))])
def test_distill_two_steps_export_and_one_step_images(family, extra, teachers, data_dir, tmp_path):
    from diffusers import DiffusionPipeline

    from fdistill.cli import main as cli_main
    from fdistill.denoisers_flow import pack_latents
    from fdistill.pipelines import build_task
    from fdistill.pipelines.diffusers_t2i import FAMILIES, encode_texts
    from fdistill.sampling import per_image_latents

    run = tmp_path / "run"
    assert cli_main(["distill", *_args(family, teachers[family], data_dir, run, *extra)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(np.isfinite(v) for v in rows[-1].values() if isinstance(v, float))
    assert (run / "samples_student.png").is_file()

    out = tmp_path / "export"
    assert cli_main(["export", str(run), str(out)]) == 0
    meta = json.loads((out / "fdistill_export.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(pipe).__name__ == FAMILIES[family][0] and meta["num_inference_steps"] == 1

    # the exported pipeline's single step is the trained generator
    task = build_task(_cfg(family, teachers[family], data_dir, tmp_path / "probe", *extra), "cpu")
    from safetensors.torch import load_file
    task.generator.load_state_dict(load_file(str(sorted(run.glob("ckpt-*"))[-1] / "generator.safetensors")))
    seeds = [3, 7]
    msl = {} if family == "sdxl" else {"max_sequence_length": 16}
    z = per_image_latents(seeds, task.generator.latent_shape)
    with torch.no_grad():
        cond = encode_texts(pipe, family, PROMPTS[:2], 16)
        if family == "sdxl":
            cond["time_ids"] = torch.tensor([[32.0, 32.0, 0, 0, 32.0, 32.0]]).expand(2, 6)
        ours = task.generator(z, cond)
        theirs = pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=meta["guidance_scale"], height=32,
                      width=32, latents=pack_latents(z) if family == "flux" else z, output_type="latent",
                      **msl).images
    if family == "flux":
        from fdistill.denoisers_flow import unpack_latents
        theirs = unpack_latents(theirs, 16, 16)
    torch.testing.assert_close(theirs.float(), ours, rtol=1e-4, atol=1e-4)
    assert (ours - z).abs().mean() > 1e-3  # not the identity

    # `fdistill sample` of the run and of the export give the same images as the stock pipeline
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    for src, name in ((run, "a"), (out, "b")):
        assert cli_main(["sample", str(src), "--prompts", str(tmp_path / "p.txt"), "--seeds", "3,7", "--outdir",
                         str(tmp_path / name), "--quiet"]) == 0
    with torch.no_grad():
        imgs = pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=meta["guidance_scale"], height=32, width=32,
                    latents=pack_latents(z) if family == "flux" else z, output_type="np", **msl).images
    ref = (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)
    for name in ("a", "b"):
        got = np.stack([np.asarray(Image.open(tmp_path / name / f"{s:06d}.png")) for s in seeds])
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("family,blocks", [("sd3", ["transformer_blocks.0"]),
                                           ("flux", ["transformer_blocks.0", "single_transformer_blocks.0"])])
def test_feature_blocks_are_a_config_key(family, blocks, teachers, data_dir, tmp_path):
    """task.feature_modules picks the transformer blocks whose image tokens the discriminator reads: one conv head
    per block, each on the latent grid of tokens."""
    from fdistill.pipelines import build_task

    task = build_task(_cfg(family, teachers[family], data_dir, tmp_path / "run",
                           f"task.feature_modules=[{','.join(blocks)}]"), "cpu")
    teacher = getattr(task.teacher, "inner", task.teacher)  # SD3: the CFG wrapper around the flow adapter
    assert teacher.feature_modules == blocks and len(task.discriminator.heads) == len(blocks)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        feats = task.teacher(torch.randn(2, 4, 16, 16, generator=g), 2.0, task.sample_cond(2, g, "cpu"),
                             mode="features")
    assert [tuple(f.shape[2:]) for f in feats] == [(8, 8)] * len(blocks)


# ----------------------------------------------------------------------------------------------------------------
# LoRA students


@pytest.fixture(scope="module")
def sd3_lora_task(teachers, data_dir, tmp_path_factory):
    from fdistill.pipelines import build_task

    torch.manual_seed(0)
    cfg = _cfg("sd3", teachers["sd3"], data_dir, tmp_path_factory.mktemp("lora"), "task.lora_rank=4",
               "task.lora_alpha=8.0")
    return build_task(cfg, "cpu")


def test_lora_adapters_disabled_is_the_teacher_bit_for_bit(sd3_lora_task, teachers):
    from diffusers import SD3Transformer2DModel

    from fdistill.denoisers_flow import FlowMatchDenoiser

    task = sd3_lora_task
    ref = FlowMatchDenoiser(SD3Transformer2DModel.from_pretrained(teachers["sd3"], subfolder="transformer"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = task.sample_cond(2, g, "cpu")
    # give the adapters non-zero B so that they change the output when active
    with torch.no_grad():
        for p in task.generator.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        teacher_inner = task.teacher.inner
        a = teacher_inner(x, 2.0, cond)
        b = ref(x, 2.0, cond)
        c = task.generator.denoiser(x, 2.0, cond)
        d = task.fake_score(x, 2.0, cond)
    assert torch.equal(a, b)  # the base with adapters disabled is the teacher, bit for bit
    assert (c - a).abs().max() > 1e-4  # the generator's adapter is live
    torch.testing.assert_close(d, a, rtol=0, atol=0)  # the fake score's adapter is still zero (B = 0)


def test_lora_trainable_parameters_are_the_adapters_only(sd3_lora_task):
    task = sd3_lora_task
    names = [n for n, p in task.generator.named_parameters() if p.requires_grad]
    assert names and all(".lora." in n and (n.endswith("A.weight") or n.endswith("B.weight")) for n in names)
    n_gen = sum(p.numel() for p in task.generator.parameters())
    n_fake = sum(p.numel() for p in task.fake_score.parameters())
    n_base = sum(p.numel() for n, p in task.teacher.named_parameters() if "lora_" not in n)
    assert n_gen == n_fake < n_base / 2  # adapters only: the base is held once, by the teacher
    gen_ids = {id(p) for p in task.generator.parameters()}
    assert not gen_ids & {id(p) for p in task.fake_score.parameters()}
    assert all(not p.requires_grad for n, p in task.teacher.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_lora_export_merged_and_lora_weights_load_into_the_teacher_pipeline(family, teachers, data_dir, tmp_path):
    from diffusers import DiffusionPipeline

    from fdistill.cli import main as cli_main
    from fdistill.denoisers_flow import pack_latents

    run = tmp_path / "run"
    assert cli_main(["distill", *_args(family, teachers[family], data_dir, run, "task.lora_rank=4",
                                       "task.lora_alpha=8.0", "steps=1", "optim.lr_gen=1e-2")]) == 0
    out = tmp_path / "export"
    assert cli_main(["export", str(run), str(out)]) == 0
    meta = json.loads((out / "fdistill_export.json").read_text())
    assert meta["lora"] and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    merged = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    base = DiffusionPipeline.from_pretrained(teachers[family], local_files_only=True)
    base.scheduler = merged.scheduler  # SDXL's export swaps in the one-step DDIM
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=1, guidance_scale=meta["guidance_scale"], height=32, width=32,
              output_type="latent", latents=pack_latents(z) if family == "flux" else z,
              **({} if family == "sdxl" else {"max_sequence_length": 16}))
    with torch.no_grad():
        m = merged("a cat", **kw).images
        t = base("a cat", **kw).images
        base.load_lora_weights(out / "lora")
        lo = base("a cat", **kw).images
    assert (m - t).abs().max() > 1e-5  # training moved the generator's adapters
    torch.testing.assert_close(lo, m, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra,message", [(("noise.grid=vp",), "noise.grid: flow"),
                                           (("task.lora_rank=4", "ema=[0.999]"), "set ema: \\[\\]"),
                                           (("task.lora_rank=4", "task.lora_targets=[nothing_here]"), "match no module")])
def test_wrong_settings_are_refused_with_the_fix(extra, message, teachers, data_dir, tmp_path):
    from fdistill.pipelines import build_task

    with pytest.raises(ValueError, match=message):
        build_task(_cfg("sd3", teachers["sd3"], data_dir, tmp_path / "run", *extra), "cpu")
    assert not (tmp_path / "run").exists()  # nothing written before the checks


def test_lora_gradient_checkpointing_recomputes_with_the_passes_own_adapter(teachers):
    """A checkpointed block recomputes during backward, after the pass's adapter was switched away: the gradients
    must still be those of the pass's own adapter (the same as without checkpointing)."""
    from diffusers import SD3Transformer2DModel

    from fdistill.denoisers_flow import FlowMatchDenoiser
    from fdistill.lora import LoraSpec, lora_networks

    def run(checkpointing):
        net = SD3Transformer2DModel.from_pretrained(teachers["sd3"], subfolder="transformer")
        gen, fake, teacher = lora_networks(net, LoraSpec(4, 4, ["to_q", "to_k", "to_v", "to_out.0"]),
                                           FlowMatchDenoiser, gradient_checkpointing=checkpointing)
        net.train()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # both adapters non-zero and different
            for p in list(gen.parameters()) + list(fake.parameters()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        x = torch.randn(2, 4, 16, 16, generator=g)
        cond = {"encoder_hidden_states": torch.randn(2, 7, 64, generator=g),
                "pooled_projections": torch.randn(2, 64, generator=g)}
        out_g = gen(x, 3.0, cond)  # the generator's pass, with its graph
        out_f = fake(x, 1.0, cond)  # the fake score's pass, with its graph
        with torch.no_grad():
            teacher(x, 2.0, cond)  # a pass with the adapters disabled in between
        (out_g.square().mean() + out_f.abs().mean()).backward()
        return [p.grad.clone() for p in list(gen.parameters()) + list(fake.parameters())]

    plain, ckpt = run(False), run(True)
    assert all(p.abs().sum() > 0 for p in plain)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["sdxl", "sd35", "flux"])
def test_step_benchmark_runs_each_family_on_its_tiny_teacher(config, tmp_path):
    """`benchmarks/step.py --config sdxl|sd35|flux --tiny` (the rows of benchmarks/RESULTS.md): the trainer's
    iterations run through each task; the counted teacher rows say CFG (2B: SDXL, SD3.5) or FLUX.1-dev's guidance
    embedding (B, no unconditional pass)."""
    import subprocess
    import sys

    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step.py"), "--config", config, "--tiny",
                           "--batch", "2", "--iters", "1", "--warmup", "1", "--repeats", "1", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.abspath(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["complete"] and r["config"] == config and r["device"] == "cpu"
    teacher = r["calls_per_iter"]["generator"]["teacher"]
    assert teacher["forward"] == 1 and teacher["rows"] == (2 if config == "flux" else 4)
    assert r["generator"]["time_s_median"] > 0 and r["critic"]["time_s_median"] > 0
