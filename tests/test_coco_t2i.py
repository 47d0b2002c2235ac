"""Stable Diffusion text-to-image: VP adapter, CFG, the coco_t2i task, the one-step SD export and COCO-30k.

Everything runs on a tiny SD pipeline built from configs (UNet2DConditionModel at 8x8 latents, CLIPTextModel
of width 32, a two-level AutoencoderKL, a byte-level CLIP tokenizer written to the test's folder): no downloads.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402

from fdistill.config import load_config  # noqa: E402
from fdistill.denoisers_vp import CFGDenoiser, VPUNetDenoiser  # noqa: E402
from fdistill.noise import vp_sigmas  # noqa: E402
from fdistill.commands import encode_latents  # noqa: E402
from fdistill.pipelines import coco_t2i  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "coco_sd15_js.yaml")
PROMPTS = ["a red bus on a street", "two dogs playing in the snow", "a plate of food", "a man riding a horse",
           "a kitchen with a stove", "a cat on a sofa"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Six non-square RGB images and a COCO 2014-style captions JSON naming them; a prompts .txt."""
    root = tmp_path_factory.mktemp("coco")
    img_dir = root / "train2014"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(6):
        name = f"COCO_train2014_{i:012d}.jpg" if i % 2 else f"COCO_train2014_{i:012d}.png"
        Image.fromarray(rng.integers(0, 256, (20 + 2 * i, 24, 3), dtype=np.uint8)).save(img_dir / name)
        images.append({"id": 100 + i, "file_name": name})
        annotations += [{"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": f" {PROMPTS[i]} number {j}\n"}
                        for j in range(2)]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    return root


def _parts(sd_dir):
    return coco_t2i.load_teacher_parts(str(sd_dir))  # unet, scheduler, vae, text encoder, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# the VP adapter


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_adapter_x0_equals_scheduler_x0_on_the_grid(sd_dir, prediction_type):
    unet, _, _, te, tok = _parts(sd_dir)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    den = VPUNetDenoiser(unet, sched.alphas_cumprod, prediction_type)
    cond = coco_t2i.encode_prompts(tok, te, PROMPTS[:2])
    seen = []
    unet.register_forward_pre_hook(lambda m, a, kw: seen.append(a[1].clone()), with_kwargs=True)
    sigmas = vp_sigmas(sched.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    for t in (0, 20, 500, 980, 999):
        x_vp = torch.randn(2, 4, 8, 8, generator=g)
        s = sigmas[t].expand(2)
        with torch.no_grad():
            x0 = den(x_vp * (1 + s[:, None, None, None] ** 2).sqrt(), s, {"encoder_hidden_states": cond})
            out = unet(x_vp, torch.tensor([t, t]), encoder_hidden_states=cond).sample
        ref = torch.stack([sched.step(out[i:i + 1], t, x_vp[i:i + 1]).pred_original_sample[0] for i in range(2)])
        torch.testing.assert_close(x0, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(sigmas[t])))
        assert torch.equal(seen[-2], torch.tensor([float(t), float(t)]))  # the exact grid timestep
    # between two grid values: a timestep between them, linear in log sigma
    s_mid = (sigmas[500].log() * 0.25 + sigmas[501].log() * 0.75).exp()
    assert float(den.timestep(s_mid.reshape(1))) == pytest.approx(500.75, abs=1e-3)
    assert float(den.timestep(torch.tensor([1e-6]))) == 0 and float(den.timestep(torch.tensor([1e6]))) == 999
    # pure noise: prior_scale makes the VP input N(0, I) at timestep 999
    assert den.prior_scale(float(sigmas[999])) == pytest.approx(float(1 / sched.alphas_cumprod[999].sqrt()), rel=1e-5)
    # the grid survives a dtype cast of the module (it is not a buffer)
    den.to(torch.bfloat16)
    assert den.sigmas.dtype == torch.float32 and torch.equal(den.timestep(sigmas[[20, 980]]), torch.tensor([20., 980.]))


def test_features_from_the_mid_block_and_cut_short(sd_dir):
    unet, sched, _, te, tok = _parts(sd_dir)
    den = VPUNetDenoiser(unet, sched.alphas_cumprod, "epsilon")
    cond = {"encoder_hidden_states": coco_t2i.encode_prompts(tok, te, PROMPTS[:3])}
    ran_up = []
    unet.up_blocks[0].register_forward_hook(lambda *a: ran_up.append(1))
    x, s = torch.randn(3, 4, 8, 8), vp_sigmas(sched.alphas_cumprod)[[100, 200, 300]]
    with torch.no_grad():
        feats = den(x, s, cond, mode="features")
        x0, feats2 = den(x, s, cond, mode="both")
    assert len(ran_up) == 1  # only the 'both' pass reached the decoder
    assert feats[0].shape == (3, 64, 4, 4)  # mid block: last channel width at 8 / 2 resolution
    torch.testing.assert_close(feats[0], feats2[0])
    torch.testing.assert_close(x0, den(x, s, cond))


# ----------------------------------------------------------------------------------------------------------------
# classifier-free guidance


def test_cfg_scale_one_is_conditional_and_guidance_is_one_batched_pass(sd_dir):
    unet, sched, _, te, tok = _parts(sd_dir)
    inner = VPUNetDenoiser(unet, sched.alphas_cumprod, "epsilon")
    emb = coco_t2i.encode_prompts(tok, te, PROMPTS[:2])
    uncond = coco_t2i.encode_prompts(tok, te, [""])
    cond = {"encoder_hidden_states": emb}
    batches = []
    unet.register_forward_pre_hook(lambda m, a, kw: batches.append(a[0].shape[0]), with_kwargs=True)
    x, s = torch.randn(2, 4, 8, 8), vp_sigmas(sched.alphas_cumprod)[[300, 700]]
    with torch.no_grad():
        x0_c = inner(x, s, cond)
        x0_u = inner(x, s, {"encoder_hidden_states": uncond.expand(2, -1, -1)})
        batches.clear()
        assert torch.equal(CFGDenoiser(inner, 1.0, uncond)(x, s, cond), x0_c)
        w = 1.75
        cfg = CFGDenoiser(inner, w, uncond)
        guided = cfg(x, s, cond)
        assert batches == [2, 4]  # scale 1: the conditional pass alone; w != 1: one pass over [cond; uncond]
        torch.testing.assert_close(guided, x0_c + (w - 1) * (x0_c - x0_u), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(guided, x0_c, atol=1e-3)  # the unconditional pass matters
        feats_c = inner(x, s, cond, mode="features")
        batches.clear()
        feats = cfg(x, s, cond, mode="features")
        g2, feats_both = cfg(x, s, cond, mode="both")
    assert batches == [2, 4]  # features alone: conditional half only
    torch.testing.assert_close(feats[0], feats_c[0])
    torch.testing.assert_close(feats_both[0], feats_c[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g2, guided)
    assert cfg.prior_scale(3.0) == inner.prior_scale(3.0)


# ----------------------------------------------------------------------------------------------------------------
# prompts and real data


def test_prompt_sources_and_caption_pairing(data_dir):
    coco = coco_t2i.read_prompts(data_dir / "captions.json")
    assert len(coco) == 12 and coco[0] == "a red bus on a street number 0"  # whitespace and newlines cleaned
    assert coco_t2i.read_prompts(data_dir / "prompts.txt") == PROMPTS  # empty lines dropped
    files = coco_t2i.list_images(data_dir / "train2014")
    assert len(files) == 6 and files == sorted(files)
    table = coco_t2i._real_caption_table(files, "", str(data_dir / "captions.json"))
    assert table[3] == [f"{PROMPTS[3]} number 0", f"{PROMPTS[3]} number 1"]
    assert coco_t2i._real_caption_table(files, "", str(data_dir / "prompts.txt")) == [[]] * 6
    # a text file: one caption per image, in sorted file order
    assert coco_t2i._real_caption_table(files, str(data_dir / "prompts.txt"), None)[5] == [PROMPTS[5]]
    with pytest.raises(ValueError, match="6 captions for 5 images"):
        coco_t2i._real_caption_table(files[:5], str(data_dir / "prompts.txt"), None)


def _cfg(sd_dir, data_dir, out, *extra):
    return load_config(CONFIG, [f"teacher={sd_dir}", f"prompts={data_dir / 'captions.json'}",
                                f"data={data_dir / 'train2014'}", f"out={out}", "batch_size=2",
                                "task.teacher_dtype=float32", *extra])


def test_task_and_one_critic_and_generator_iteration(sd_dir, data_dir, tmp_path, monkeypatch):
    from fdistill.divergences import get_divergence
    from fdistill.objective import FDistill
    from fdistill.ratio import RatioNormalizer

    cfg = _cfg(sd_dir, data_dir, tmp_path / "run", "objective.r1_gamma=1.0")  # the fastgen recipe's R1 is 0
    assert cfg.recipe == "fastgen" and cfg.task["text_mask"] and cfg.objective.denoise_loss == "x0"
    torch.manual_seed(0)
    task = coco_t2i.build(cfg, "cpu")
    cache = list((tmp_path / "run" / "cache").glob("latents-*.npy"))
    assert len(cache) == 1
    lat = np.load(cache[0])
    assert lat.shape == (6, 4, 8, 8) and lat.dtype == np.float16
    # the cache holds the VAE posterior means of the centre-cropped images
    vae = task.info["vae"]
    x = coco_t2i.load_image(data_dir / "train2014" / coco_t2i.list_images(data_dir / "train2014")[2], 16)
    torch.testing.assert_close(torch.from_numpy(lat[2]).float(), coco_t2i.encode_images(vae, x[None])[0],
                               atol=2e-3, rtol=2e-3)
    assert task.info["real_paired"] == 6 and task.info["text_cache"] == "memory"
    # the noise schedule is the teacher's DDPM grid; the generator starts at timestep 999
    sched = DDPMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    torch.testing.assert_close(task.schedule.sigmas, vp_sigmas(sched.alphas_cumprod))
    assert task.generator.generator_sigma == pytest.approx(float(task.schedule.sigmas[999]))
    assert isinstance(task.teacher, CFGDenoiser) and task.teacher.guidance_scale == 1.75
    assert not any(p.requires_grad for p in task.teacher.parameters())

    # a second build reuses the cache (encoding again would fail)
    monkeypatch.setattr(coco_t2i, "encode_images", lambda *a: (_ for _ in ()).throw(AssertionError("re-encoded")))
    torch.manual_seed(0)
    task = coco_t2i.build(cfg, "cpu")

    rng = torch.Generator().manual_seed(0)
    cond = task.sample_cond(2, rng, "cpu")
    assert cond["encoder_hidden_states"].shape == (2, 16, 32)
    # FastGen's SD15 network masks the padding tokens: BOS + words + EOS attend, the rest does not
    mask = cond["encoder_attention_mask"]
    assert mask.shape == (2, 16) and bool((mask[:, :2] == 1).all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())
    assert task.teacher.uncond(1)["encoder_attention_mask"].sum() == 2  # the empty prompt: BOS and EOS
    x_real, cond_real = task.sample_real(2, rng, "cpu")
    assert x_real.shape == (2, 4, 8, 8) and cond_real["encoder_hidden_states"].shape == (2, 16, 32)

    obj = FDistill(task.generator, task.teacher, task.fake_score, task.discriminator, get_divergence("js"),
                   RatioNormalizer(cfg.ratio_norm, task.schedule.t_range), task.schedule, cfg.objective)
    z = task.generator.sample_latents(2, rng)
    loss_c, logs_c = obj.critic_loss(z, cond, x_real, cond_real, rng)
    loss_c.backward()
    assert torch.isfinite(loss_c) and "r1" in logs_c
    assert all(p.grad is not None for p in task.discriminator.parameters())
    assert task.fake_score.unet.conv_out.weight.grad.abs().sum() > 0
    assert task.generator.denoiser.unet.conv_out.weight.grad is None  # the critic step leaves the generator alone
    task.teacher.inner.reset_calls()
    loss_g, logs_g = obj.generator_loss(z, cond, rng)
    loss_g.backward()
    assert torch.isfinite(loss_g) and logs_g["loss_dm"] > 0
    assert task.generator.denoiser.unet.conv_in.weight.grad.abs().sum() > 0
    # one teacher pass of the generator step served score and features: one 'both' call, over [cond; uncond]
    assert task.teacher.inner.calls == {"x0": 0, "features": 0, "both": 1}


def test_export_to_stock_pipeline_gives_our_one_step_images(sd_dir, tmp_path):
    from fdistill.export_sd import export_sd_pipeline
    from fdistill.generator import OneStepGenerator

    unet, sched, vae, te, tok = _parts(sd_dir)
    torch.manual_seed(3)
    with torch.no_grad():  # a "distilled" UNet that differs from the teacher
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    den = VPUNetDenoiser(unet, sched.alphas_cumprod, "epsilon")
    gen = OneStepGenerator(den, float(den.sigmas[999]), (4, 8, 8))
    out = export_sd_pipeline(gen, str(sd_dir), tmp_path / "export")
    meta = json.loads((out / "fdistill_export.json").read_text())
    assert meta["num_inference_steps"] == 1 and meta["scheduler"]["timestep_spacing"] == "trailing"
    with pytest.raises(FileExistsError):
        export_sd_pipeline(gen, str(sd_dir), out)

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = PROMPTS[:2]
    ours_lat = gen(z, {"encoder_hidden_states": coco_t2i.encode_prompts(tok, te, prompts)}).detach()
    theirs_lat = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="latent").images
    assert pipe.scheduler.timesteps.tolist() == [999]
    torch.testing.assert_close(theirs_lat, ours_lat, rtol=1e-4, atol=1e-4)
    ours = (coco_t2i.decode(vae, ours_lat) + 1) / 2
    theirs = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="pt").images
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # and it is not simply the teacher's one-step output
    teacher = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    teacher.scheduler = pipe.scheduler
    t_lat = teacher(prompts, num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="latent").images
    assert (t_lat - theirs_lat).abs().max() > 1e-2


def test_cli_distill_end_to_end_and_export_from_checkpoint(sd_dir, data_dir, tmp_path):
    from fdistill.cli import main as cli_main
    from fdistill.export_sd import export_from_checkpoint, unet_from_checkpoint

    run = tmp_path / "run"
    rc = cli_main(["distill", CONFIG, f"teacher={sd_dir}", f"prompts={data_dir / 'prompts.txt'}",
                   f"data={data_dir / 'train2014'}", "steps=2", "batch_size=2", f"out={run}", "log.progress=false"])
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(np.isfinite(v) for v in rows[-1].values())
    assert (run / "samples_student.png").is_file() and (run / "ckpt-00000002" / "meta.json").is_file()
    # checkpoint -> stock pipeline
    unet, meta = unet_from_checkpoint(run)
    assert meta["weights"] == "generator"  # the config keeps no EMA
    from safetensors.torch import load_file
    saved = load_file(str(run / "ckpt-00000002" / "generator.safetensors"))
    torch.testing.assert_close(unet.conv_out.weight, saved["denoiser.backbone.conv_out.weight"])
    out = export_from_checkpoint(run, tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    img = pipe("a cat", num_inference_steps=1, guidance_scale=1.0, output_type="np").images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()


def test_sd_export_takes_the_ema_that_training_evaluated(sd_dir, tmp_path):
    """With ema: [0.9999, 0.999] training evaluates (and reports) ema_0.9999, the first configured; the export and
    `fdistill sample` must take that one too, not the first file name in sorted order (ema_0.999)."""
    from safetensors.torch import save_file

    from fdistill.export_sd import unet_from_checkpoint

    ckpt = tmp_path / "run" / "ckpt-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"gen_step": 1, "config": {
        "pipeline": "coco_t2i", "teacher": str(sd_dir), "ema": [0.9999, 0.999]}}))
    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    for decay, fill in (("0.9999", 1.0), ("0.999", 2.0)):  # AveragedModel's keys: 'module.' + n_averaged
        sd = {f"module.denoiser.backbone.{k}": (torch.full_like(v, fill) if k == "conv_out.bias" else v)
              for k, v in unet.state_dict().items()}
        save_file({**sd, "n_averaged": torch.tensor(1)}, str(ckpt / f"ema_{decay}.safetensors"))
    got, meta = unet_from_checkpoint(tmp_path / "run")
    assert meta["weights"] == "ema_0.9999"
    assert torch.all(got.conv_out.bias == 1.0)


def test_prompt_bank_modes_agree(sd_dir, tmp_path):
    _, _, _, te, tok = _parts(sd_dir)
    texts = PROMPTS + [""]
    exact = coco_t2i.encode_prompts(tok, te, texts)
    ids = torch.tensor([3, 0, 6, 3])
    banks = {m: coco_t2i.PromptBank(texts, tok, te, m, tmp_path / "text.npy", batch_size=3)
             for m in ("memory", "disk", "online")}
    assert (tmp_path / "text.npy").is_file() and banks["memory"].text_encoder is None
    for mode, bank in banks.items():
        torch.testing.assert_close(bank.get(ids, "cpu"), exact[ids], rtol=2e-3, atol=2e-3)
    # online encodes [3, 0, 6, 3] as one batch, `exact` all seven texts: the same maths over other batch shapes,
    # which BLAS may sum in another order, so float32 agreement, not bit-equality (which held on one machine only)
    torch.testing.assert_close(banks["online"].get(ids, "cpu"), exact[ids], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="text_cache"):
        coco_t2i.PromptBank(texts, tok, te, "nope")


# ----------------------------------------------------------------------------------------------------------------
# COCO-30k


def _val_json(root, n_images=8):
    images = [{"id": 5000 + 7 * i, "file_name": f"COCO_val2014_{5000 + 7 * i:012d}.jpg"} for i in range(n_images)]
    anns = [{"id": 90000 - k, "image_id": im["id"], "caption": f"caption {k % 3} of image {im['id']}"}
            for k, im in enumerate(im for im in images for _ in range(3))]
    anns.append({"id": 1, "image_id": 999999, "caption": "an annotation without an image"})
    path = root / "captions_val2014.json"
    path.write_text(json.dumps({"images": images + [{"id": 4, "file_name": "uncaptioned.jpg"}], "annotations": anns}))
    return path, images


def test_coco30k_caption_selection(tmp_path):
    from fdistill.pipelines.coco_eval import select_captions

    path, images = _val_json(tmp_path)
    sel = select_captions(path, num=5, seed=0)
    assert sel == select_captions(path, num=5, seed=0)  # deterministic
    assert len({s["image_id"] for s in sel}) == 5  # one caption per image, distinct images
    by_id = {im["id"]: im["file_name"] for im in images}
    for s in sel:
        assert s["file_name"] == by_id[s["image_id"]] and s["caption"].endswith(f"of image {s['image_id']}")
    assert [s["image_id"] for s in select_captions(path, 5, seed=1)] != [s["image_id"] for s in sel]
    assert {s["image_id"] for s in select_captions(path, 8, 0)} == set(by_id)  # uncaptioned images never chosen
    with pytest.raises(ValueError, match="fewer than the 9"):
        select_captions(path, num=9)


def _pooled(x):
    """A cheap stand-in for Inception (3-d mean colour; full-rank covariances from 5 images): orchestration, not the
    metric, is under test here."""
    return x.float().mean(dim=(2, 3))


def test_coco30k_end_to_end_tiny(sd_dir, tmp_path):
    import open_clip

    from fdistill.export_sd import export_sd_pipeline
    from fdistill.commands import coco_eval as coco_eval_cmd

    model = export_sd_pipeline(_parts(sd_dir)[0], str(sd_dir), tmp_path / "student")
    path, images = _val_json(tmp_path)
    val = tmp_path / "val2014"
    val.mkdir()
    rng = np.random.default_rng(1)
    for im in images:
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(val / im["file_name"])
    torch.manual_seed(0)
    clip_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                                "patch_size": 8},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    clip = (open_clip.model.CLIP(**clip_cfg).eval(), open_clip.transform.image_transform(32, is_train=False),
            open_clip.tokenizer.SimpleTokenizer(context_length=16))
    args = coco_eval_cmd.build_parser().parse_args([str(model), "--captions", str(path), "--images", str(val), "--out",
                                                str(tmp_path / "eval"), "--num", "5", "--batch-size", "2",
                                                "--device", "cpu", "--quiet"])
    res = coco_eval_cmd.run(args, inception=_pooled, clip_model=clip)
    assert res["generated_now"] == 5 and np.isfinite(res["fid"]) and res["fid"] > 0
    assert -1 <= res["clip_score"] <= 1
    pngs = sorted((tmp_path / "eval" / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(5)]
    assert np.asarray(Image.open(pngs[0])).shape == (16, 16, 3)
    # image i is the one-step sample of caption i from the latent seeded i
    sel = json.loads((tmp_path / "eval" / "selection.json").read_text())["selection"]
    assert (tmp_path / "eval" / "captions.txt").read_text().splitlines() == [s["caption"] for s in sel]
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    img = pipe(sel[3]["caption"], num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="np").images[0]
    assert np.abs((img * 255).round() - np.asarray(Image.open(pngs[3]), dtype=np.float64)).max() <= 1
    # resumable: a rerun generates nothing and reproduces the numbers (reference statistics from the cache)
    (tmp_path / "eval" / "images" / "00004.png").unlink()
    res2 = coco_eval_cmd.run(args, inception=_pooled, clip_model=clip)
    assert res2["generated_now"] == 1 and (tmp_path / "eval" / "ref_stats.npz").is_file()
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-6)
    assert res2["clip_score"] == pytest.approx(res["clip_score"], abs=1e-6)


def test_pre_encoded_latents_keep_their_captions(sd_dir, data_dir, tmp_path):
    out = tmp_path / "lat" / "train.npy"
    assert encode_latents.main(["encode-latents", "--teacher", str(sd_dir), "--data", str(data_dir / "train2014"),
                          "--out", str(out), "--batch-size", "4", "--device", "cpu"]) == 0
    lat = np.load(out)
    assert lat.shape == (6, 4, 8, 8)
    assert json.loads(out.with_suffix(".json").read_text())["files"] == coco_t2i.list_images(data_dir / "train2014")
    torch.manual_seed(0)
    task = coco_t2i.build(_cfg(sd_dir, data_dir, tmp_path / "run", f"data={out}"), "cpu")
    assert task.info["num_real"] == 6 and task.info["real_paired"] == 6
    assert not (tmp_path / "run" / "cache").exists() or not list((tmp_path / "run" / "cache").glob("latents-*"))
    with pytest.raises(ValueError, match="noise.grid"):
        coco_t2i.build(_cfg(sd_dir, data_dir, tmp_path / "run", "noise.grid=edm"), "cpu")
    with pytest.raises(ValueError, match="task.guidance"):
        coco_t2i.build(_cfg(sd_dir, data_dir, tmp_path / "run", "task.guidance=2.0"), "cpu")
